"""Embeddings held to the reference (LAVIS `Blip2Qformer.extract_features`): on the weights of a stage-1 export the
five kinds of `Blip2Scorer.embed` equal those of a literal transcription of it, and transformers' own
`Blip2ForImageTextRetrieval` forward; the API's forms and refusals; `search` ranks as `score(head="itc")`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_train.utils.errors import ConfigError

# captions that clean_caption leaves as they are (lower case, no punctuation) and short of max_txt_len: the
# reference tokenizes them as given, so the same ids reach both sides
CAPTIONS = ["a red circle in the top left", "a blue square", "there is a green triangle at the bottom right",
            "a yellow circle"]


@pytest.fixture(scope="module")
def scorer(stage1_export):
    import blip2_train

    return blip2_train.load(stage1_export, device="cpu")


@pytest.fixture(scope="module")
def images(synth) -> list[str]:
    entries = json.loads((Path(synth["dir"]) / "coco/annotations/coco_karpathy_test.json").read_text())
    return [str(synth["root"] / e["image"]) for e in entries[:len(CAPTIONS)]]


class Reference:
    """LAVIS `Blip2Qformer.extract_features`, line by line, over the export's modules under the reference's names:
    visual_encoder (the ViT without its last LayerNorm), ln_vision (that LayerNorm), Qformer.bert (embeddings,
    then the BERT encoder, cross-attending the image from the query rows), query_tokens, vision_proj, text_proj
    and the tokenizer (padding=True, no cleaning or truncation, as the reference)."""

    def __init__(self, model, tokenizer):
        hf = model.hf
        self.visual_encoder = lambda image: hf.vision_model.encoder(
            inputs_embeds=hf.vision_model.embeddings(image)).last_hidden_state
        self.ln_vision = hf.vision_model.post_layernorm
        self.query_tokens, self.vision_proj, self.text_proj = hf.query_tokens, hf.vision_projection, hf.text_projection
        self.tokenizer, self.hf, self.device = tokenizer, hf, torch.device("cpu")

    def bert(self, input_ids=None, query_embeds=None, attention_mask=None, encoder_hidden_states=None,
             encoder_attention_mask=None):
        """`Qformer.bert(...)`: BertEmbeddings([query_embeds; word embeddings]) then the encoder, the first
        query_embeds.shape[1] rows cross-attending encoder_hidden_states."""
        emb = self.hf.embeddings(input_ids=input_ids, query_embeds=query_embeds)
        return self.hf.qformer(query_embeds=emb, query_length=0 if query_embeds is None else query_embeds.shape[1],
                               attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask)

    @torch.no_grad()
    def extract_features(self, samples, mode="multimodal"):
        image = samples.get("image")
        caption = samples.get("text_input")
        image_embeds, text_embeds, multimodal_embeds = None, None, None
        image_features, text_features = None, None
        if mode == "image":
            image_embeds_frozen = self.ln_vision(self.visual_encoder(image))
            image_embeds_frozen = image_embeds_frozen.float()
            image_atts = torch.ones(image_embeds_frozen.size()[:-1], dtype=torch.long).to(self.device)
            query_tokens = self.query_tokens.expand(image_embeds_frozen.shape[0], -1, -1)
            query_output = self.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds_frozen,
                                     encoder_attention_mask=image_atts)
            image_embeds = query_output.last_hidden_state
            image_features = F.normalize(self.vision_proj(image_embeds), dim=-1)
        elif mode == "text":
            text = self.tokenizer(caption, return_tensors="pt", padding=True).to(self.device)
            text_output = self.bert(text.input_ids, attention_mask=text.attention_mask)
            text_embeds = text_output.last_hidden_state
            text_features = self.text_proj(text_embeds)
            text_features = F.normalize(text_features, dim=-1)
        elif mode == "multimodal":
            image_embeds_frozen = self.ln_vision(self.visual_encoder(image))
            image_embeds_frozen = image_embeds_frozen.float()
            image_atts = torch.ones(image_embeds_frozen.size()[:-1], dtype=torch.long).to(self.device)
            query_tokens = self.query_tokens.expand(image_embeds_frozen.shape[0], -1, -1)
            query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long).to(self.device)
            text = self.tokenizer(caption, return_tensors="pt", padding=True).to(self.device)
            attention_mask = torch.cat([query_atts, text.attention_mask], dim=1)
            output = self.bert(text.input_ids, query_embeds=query_tokens, attention_mask=attention_mask,
                               encoder_hidden_states=image_embeds_frozen, encoder_attention_mask=image_atts)
            multimodal_embeds = output.last_hidden_state[:, : query_tokens.size(1), :]
        return dict(image_embeds=image_embeds, image_embeds_proj=image_features, text_embeds=text_embeds,
                    text_embeds_proj=text_features, multimodal_embeds=multimodal_embeds)


def test_five_kinds_equal_the_reference_extract_features(scorer, images):
    """Every kind of `embed(images, texts)` equals the reference's (mode image, text, multimodal) on the same
    weights to fp32 rounding, and the shapes are [B, Q, H], [B, Q, D], [B, L, H], [B, L, D], [B, Q, H]."""
    ours = scorer.embed(images=images, texts=CAPTIONS)
    ref = Reference(scorer.model, scorer.tokenizer)
    pixels = scorer.pixels(images)
    want = {**{k: v for k, v in ref.extract_features({"image": pixels}, "image").items() if v is not None},
            **{k: v for k, v in ref.extract_features({"text_input": CAPTIONS}, "text").items() if v is not None},
            "multimodal_embeds": ref.extract_features({"image": pixels, "text_input": CAPTIONS})["multimodal_embeds"]}
    b, q, h, d = len(images), scorer.model.num_query_tokens, 32, 16
    length = want["text_embeds"].shape[1]
    shapes = {"image_embeds": (b, q, h), "image_embeds_proj": (b, q, d), "text_embeds": (b, length, h),
              "text_embeds_proj": (b, length, d), "multimodal_embeds": (b, q, h)}
    assert set(ours) == set(shapes) | {"text_mask"}
    for k, shape in shapes.items():
        assert ours[k].shape == shape and ours[k].dtype == np.float32, k
        np.testing.assert_allclose(ours[k], want[k].numpy(), atol=1e-5, rtol=0, err_msg=k)
    assert ours["text_mask"].sum(1).tolist() == [len(scorer.tokenizer(c)["input_ids"]) for c in CAPTIONS]
    # the texts differ in length: a pass that let padding in would move the shorter ones' rows
    assert len(set(ours["text_mask"].sum(1).tolist())) > 1


def test_kinds_agree_with_transformers_own_retrieval_forward(scorer, images):
    """transformers' Blip2ForImageTextRetrieval on the export's weights: its normalised query features are
    image_embeds_proj, its text feature is text_embeds_proj[:, 0], and its ITM logits are the ITM head on
    multimodal_embeds averaged over queries."""
    ours = scorer.embed(images=images, texts=CAPTIONS)
    tok = scorer.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    pixels = scorer.pixels(images)
    hf = scorer.model.hf
    with torch.no_grad():
        itc = hf(pixel_values=pixels, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                 use_image_text_matching_head=False)
        itm = hf(pixel_values=pixels, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                 use_image_text_matching_head=True)
        ours_itm = hf.itm_head(torch.from_numpy(ours["multimodal_embeds"])).mean(1)
    np.testing.assert_allclose(ours["image_embeds_proj"], itc.image_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours["text_embeds_proj"][:, 0], itc.text_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours_itm.numpy(), itm.logits_per_image.numpy(), atol=1e-5, rtol=0)


def test_embed_forms_batches_and_refusals(scorer, images, tmp_path):
    """Images alone give the image kinds, texts alone the text kinds; one image or string is a batch of one; the
    batch size changes nothing; a bad image raises naming it or, skipped, leaves its row out with `index`; an
    unknown kind or one the inputs cannot give is a ConfigError naming it."""
    from blip2_train.utils.errors import DataError

    alone = scorer.embed(images=images)
    assert set(alone) == {"image_embeds", "image_embeds_proj"}
    assert set(scorer.embed(texts=CAPTIONS)) == {"text_embeds", "text_embeds_proj", "text_mask"}
    assert scorer.embed(images=images[0])["image_embeds"].shape[0] == 1
    assert scorer.embed(texts="a red circle", kinds=["text_embeds_proj"])["text_embeds_proj"].shape[0] == 1
    both = scorer.embed(images=images, texts=CAPTIONS, batch_size=32)
    one_by_one = scorer.embed(images=images, texts=CAPTIONS, batch_size=1)
    for k in both:
        np.testing.assert_allclose(both[k], one_by_one[k], atol=1e-6, rtol=0, err_msg=k)
    np.testing.assert_allclose(alone["image_embeds"], both["image_embeds"], atol=1e-6, rtol=0)

    bad = tmp_path / "bad.jpg"
    bad.write_text("not a picture\n")
    with pytest.raises(DataError, match="bad.jpg"):
        scorer.embed(images=[images[0], str(bad)])
    skip = scorer.embed(images=[images[0], str(bad), images[1]], texts=["a", "b", "c"], on_error="skip")
    assert skip["index"].tolist() == [0, 2] and skip["image_embeds"].shape[0] == 2
    np.testing.assert_allclose(skip["image_embeds"], alone["image_embeds"][:2], atol=1e-6, rtol=0)
    assert skip["text_embeds"].shape[0] == 2

    with pytest.raises(ConfigError, match="unknown kind 'image_feats'"):
        scorer.embed(images=images, kinds=["image_feats"])
    with pytest.raises(ConfigError, match="'multimodal_embeds' needs images and texts"):
        scorer.embed(images=images, kinds=["multimodal_embeds"])
    with pytest.raises(ConfigError, match="'text_embeds' needs texts"):
        scorer.embed(images=images, kinds="text_embeds")
    with pytest.raises(ValueError, match="4 images but 2 texts"):
        scorer.embed(images=images, texts=CAPTIONS[:2])


def test_search_ranks_images_as_score_itc(scorer, synth):
    """`search` over image_embeds_proj and a query's text_embeds_proj: the ITC scores of `score(head="itc")`
    for every (image, query) pair, and the images in the order of those scores."""
    from blip2_train.eval.embedding import search

    entries = json.loads((Path(synth["dir"]) / "coco/annotations/coco_karpathy_test.json").read_text())
    paths = [str(synth["root"] / e["image"]) for e in entries]
    index = scorer.embed(images=paths, kinds=["image_embeds_proj"])
    queries = ["a red circle", "a blue square at the bottom"]
    q = scorer.embed(texts=queries, kinds=["text_embeds_proj"])
    scores, top = search(index["image_embeds_proj"], q["text_embeds_proj"], k=len(paths))
    for t, query in enumerate(queries):
        itc = np.asarray(scorer.score(paths, [query] * len(paths), head="itc"))
        np.testing.assert_allclose(scores[t], itc[top[t]], atol=1e-5, rtol=0)
        assert top[t].tolist() == np.argsort(-itc, kind="stable").tolist()
        assert len(set(np.round(itc, 4).tolist())) > len(paths) // 2  # an order worth checking: few ties
    top3 = search(index["image_embeds_proj"], q["text_embeds_proj"][:, 0], k=3)[1]
    assert top3.tolist() == top[:, :3].tolist()  # [T, D] text features rank the same
