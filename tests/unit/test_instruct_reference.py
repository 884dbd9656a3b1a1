"""InstructBLIP held to the reference (LAVIS `Blip2VicunaInstruct` / `Blip2T5Instruct`): on identical weights our
token layout, labels, loss and beam-search ids equal those of a literal transcription of its forward / generate;
its released `.pth` layout imports to the same loss; an export generates the same ids in plain transformers."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.tiny import TINY_QFORMER, TINY_VISION

MAX_TXT_LEN, MAX_OUT = 24, 12  # small enough that the long instruction and the long answer below are cut
INSTRUCTIONS = ["what colour is the circle?", "Question: is there a blue square at the bottom right next to a "
                "small green triangle? Short answer:", "A short image caption:", "where is the triangle?"]
ANSWERS = ["red", "yes", "there is a blue square at the bottom right next to a small green triangle", "top left"]
REFERENCE_SPECIALS = {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"}
FAMILY_KW = {"llama": dict(text_specials=REFERENCE_SPECIALS), "t5": dict(llm_config={"dense_act_fn": "gelu"})}


def tiny_instruct(llm_dir, family, **kw):
    from blip2_train.models.build_instruct import build_instruct_model

    fam = dict(FAMILY_KW[family])
    specials = fam.pop("text_specials", None)
    args = dict(llm=str(llm_dir), vision=TINY_VISION, qformer=TINY_QFORMER, num_query_tokens=4, llm_dtype="float32",
                attn_implementation="eager", llm_attn_implementation="eager", seed=0, ln_vision_eps=1e-5,
                text={"kind": "instruct", "qformer_tokenizer": kw.pop("qformer_tokenizer"), "special_tokens": specials})
    args.update(fam, **kw)
    return build_instruct_model(**args)


def trained_like(model):
    """Off its init, so that a weight landing in the wrong place would show."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (model.hf.language_projection.weight, model.hf.query_tokens,
                  model.hf.qformer.embeddings.word_embeddings.weight, model.hf.vision_model.post_layernorm.weight):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_llms, stage1_export):
    return {fam: trained_like(tiny_instruct(tiny_llms[fam], fam, stage1_checkpoint=str(stage1_export),
                                            qformer_tokenizer=str(stage1_export)))
            for fam in ("llama", "t5")}


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def collator(model, llm_dir, qformer_dir, family):
    from blip2_train.data.collate import InstructCollator
    from blip2_train.models.build_instruct import load_instruct_tokenizer, load_qformer_text_tokenizer

    tok = load_instruct_tokenizer(llm_dir, REFERENCE_SPECIALS if family == "llama" else None)
    return InstructCollator(tok, load_qformer_text_tokenizer(qformer_dir), model.num_query_tokens, model.image_token_id,
                            MAX_TXT_LEN, MAX_OUT, encoder_decoder=model.is_encoder_decoder)


def batch(col, pix):
    return col([{"image": pix[i], "instruction": s, "answer": a, "image_id": i}
                for i, (s, a) in enumerate(zip(INSTRUCTIONS, ANSWERS))])


# --- a literal transcription of the reference ------------------------------------------------------------


class Reference:
    """LAVIS `Blip2VicunaInstruct.forward` / `generate` and `Blip2T5Instruct.forward` / `generate`, line by line,
    on a copy of our model's modules (identical weights; the Q-Former and ViT key maps are held to the reference by
    the stage-1 tests). Tokenizers are loaded from the directories as the reference loads them. The reference's
    slow LlamaTokenizer reads its bos id at call time, so after `add_special_tokens({'bos_token': '</s>'})` its
    texts start with `</s>`; a fast tokenizer keeps the template's old BOS, which `_slow_bos` swaps."""

    def __init__(self, model, llm_dir, qformer_dir, family):
        from transformers import AutoTokenizer

        from blip2_train.models.tokenizer import load_qformer_tokenizer

        self.family = family
        self.vision, self.Qformer = copy.deepcopy(model.hf.vision_model), copy.deepcopy(model.hf.qformer)
        self.query_tokens, self.proj = model.hf.query_tokens, copy.deepcopy(model.hf.language_projection)
        self.llm = copy.deepcopy(model.llm).eval()
        self.tokenizer = load_qformer_tokenizer(qformer_dir)
        self.tokenizer.truncation_side = "left"  # init_tokenizer(truncation_side="left")
        if family == "llama":
            self.llm_tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), truncation_side="left")
            self.old_bos = self.llm_tokenizer.bos_token_id
            for k, v in REFERENCE_SPECIALS.items():
                self.llm_tokenizer.add_special_tokens({k: v})
        else:
            self.t5_tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), truncation_side="left")
            self.t5_output_tokenizer = AutoTokenizer.from_pretrained(str(llm_dir), truncation_side="right")

    def _slow_bos(self, tokens):
        tokens["input_ids"][tokens["input_ids"] == self.old_bos] = self.llm_tokenizer.bos_token_id
        return tokens

    def query_output(self, image, prompt):
        x = self.vision.embeddings(image)
        image_embeds = self.vision.post_layernorm(self.vision.encoder(inputs_embeds=x).last_hidden_state)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        text_Qformer = self.tokenizer(prompt, padding="longest", truncation=True, max_length=MAX_TXT_LEN,
                                      return_tensors="pt")
        query_atts = torch.ones(query_tokens.size()[:-1], dtype=torch.long)
        Qformer_atts = torch.cat([query_atts, text_Qformer.attention_mask], dim=1)
        out = self.Qformer(input_ids=text_Qformer.input_ids, attention_mask=Qformer_atts, query_embeds=query_tokens,
                           encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
        inputs_llm = self.proj(out.last_hidden_state[:, : query_tokens.size(1), :])
        return inputs_llm, torch.ones(inputs_llm.size()[:-1], dtype=torch.long)

    @staticmethod
    def concat_text_input_output(input_ids, input_atts, output_ids, output_atts):
        input_part_targets_len, llm_tokens = [], {"input_ids": [], "attention_mask": []}
        for i in range(input_ids.size(0)):
            this_input_ones = input_atts[i].sum()
            input_part_targets_len.append(this_input_ones)
            llm_tokens["input_ids"].append(torch.cat([input_ids[i][:this_input_ones], output_ids[i][1:],
                                                      input_ids[i][this_input_ones:]]))
            llm_tokens["attention_mask"].append(torch.cat([input_atts[i][:this_input_ones], output_atts[i][1:],
                                                           input_atts[i][this_input_ones:]]))
        return {k: torch.stack(v) for k, v in llm_tokens.items()}, input_part_targets_len

    def vicuna_forward(self, image, text_input, text_output):
        inputs_llm, atts_llm = self.query_output(image, text_input)
        tok = self.llm_tokenizer
        tok.padding_side, tok.truncation_side = "right", "left"
        text_input_tokens = self._slow_bos(tok(text_input, return_tensors="pt", padding="longest", truncation=True,
                                               max_length=MAX_TXT_LEN))
        tok.truncation_side = "right"
        text_output_tokens = self._slow_bos(tok([t + tok.eos_token for t in text_output], return_tensors="pt",
                                                padding="longest", truncation=True, max_length=MAX_OUT))
        llm_tokens, input_part_targets_len = self.concat_text_input_output(
            text_input_tokens.input_ids, text_input_tokens.attention_mask, text_output_tokens.input_ids,
            text_output_tokens.attention_mask)
        targets = llm_tokens["input_ids"].masked_fill(llm_tokens["input_ids"] == tok.pad_token_id, -100)
        for i, n in enumerate(input_part_targets_len):
            targets[i][:n] = -100
        targets = torch.cat([torch.ones(atts_llm.size(), dtype=torch.long).fill_(-100), targets], dim=1)
        inputs_embeds = torch.cat([inputs_llm, self.llm.get_input_embeddings()(llm_tokens["input_ids"])], dim=1)
        attention_mask = torch.cat([atts_llm, llm_tokens["attention_mask"]], dim=1)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, labels=targets)
        return out.loss, targets, llm_tokens

    def t5_forward(self, image, text_input, text_output):
        inputs_t5, atts_t5 = self.query_output(image, text_input)
        input_tokens = self.t5_tokenizer(text_input, padding="longest", truncation=True, max_length=MAX_TXT_LEN,
                                         return_tensors="pt")
        output_tokens = self.t5_output_tokenizer(text_output, padding="longest", truncation=True, max_length=MAX_OUT,
                                                 return_tensors="pt")
        encoder_atts = torch.cat([atts_t5, input_tokens.attention_mask], dim=1)
        targets = output_tokens.input_ids.masked_fill(output_tokens.input_ids == self.t5_tokenizer.pad_token_id, -100)
        inputs_embeds = torch.cat([inputs_t5, self.llm.encoder.embed_tokens(input_tokens.input_ids)], dim=1)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=encoder_atts,
                       decoder_attention_mask=output_tokens.attention_mask, return_dict=True, labels=targets)
        return out.loss, targets, input_tokens

    @torch.no_grad()
    def generate(self, image, prompt, **kw):
        """Beam search as the reference (its `max_length` -> `max_new_tokens`, which we always pass)."""
        inputs_llm, atts_llm = self.query_output(image, prompt)
        if self.family == "llama":
            self.llm_tokenizer.padding_side = "left"
            tokens = self._slow_bos(self.llm_tokenizer(prompt, padding="longest", return_tensors="pt"))
        else:
            tokens = self.t5_tokenizer(prompt, padding="longest", return_tensors="pt")
        inputs_embeds = torch.cat([inputs_llm, self.llm.get_input_embeddings()(tokens.input_ids)], dim=1)
        attention_mask = torch.cat([atts_llm, tokens.attention_mask], dim=1)
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw)


# --- the tests -------------------------------------------------------------------------------------------


def test_vicuna_layout_loss_and_beams_match_the_reference(models, tiny_llms, stage1_export):
    ours = models["llama"]
    ref = Reference(ours, tiny_llms["llama"], stage1_export, "llama")
    pix = images(len(INSTRUCTIONS))
    col = collator(ours, tiny_llms["llama"], stage1_export, "llama")
    b = batch(col, pix)
    with torch.no_grad():
        ref_loss, targets, tokens = ref.vicuna_forward(pix, INSTRUCTIONS, ANSWERS)
        loss = ours(b["image"], b["qformer_input_ids"], b["qformer_attention_mask"], b["input_ids"],
                    b["attention_mask"], b["labels"]).loss
    q, n = ours.num_query_tokens, b["input_ids"].shape[1]
    # the reference pads inputs and answers each to their longest, so its rows end in more padding than ours
    assert not tokens["attention_mask"][:, n - q:].any() and (targets[:, n:] == -100).all()
    assert torch.equal(b["input_ids"][:, q:], tokens["input_ids"][:, : n - q])  # [bos] instruction answer </s> [PAD]
    assert torch.equal(b["attention_mask"][:, q:], tokens["attention_mask"][:, : n - q])
    assert torch.equal(b["labels"], targets[:, :n])
    # the rules themselves: BOS is </s>; the long instruction is cut from the left (its BOS kept); the long
    # answer is cut from the right and loses its end token; the others end with it as a target
    tok = col.tok_in
    assert (b["input_ids"][:, q] == tok.convert_tokens_to_ids("</s>")).all()
    assert b["instructions_truncated"] == 1 and int(b["attention_mask"][1].sum()) > q + MAX_TXT_LEN - 1
    end = tok.eos_token_id
    assert [end in row.tolist() for row in b["labels"]] == [True, True, False, True]
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)

    # beam search: the reference's defaults but the repetition penalty (docs/reference.md: transformers also
    # penalises the prompt's tokens when input_ids are passed, as InstructBlipForConditionalGeneration does)
    gen = col.generation_inputs(INSTRUCTIONS)
    kw = dict(num_beams=5, max_new_tokens=8, min_new_tokens=1, length_penalty=1.0)
    mine = ours.new_tokens(ours.generate(pix, **gen, **kw), gen["input_ids"])
    theirs = ref.generate(pix, INSTRUCTIONS, **kw)
    assert torch.equal(mine, theirs)


def test_flant5_layout_loss_and_beams_match_the_reference(models, tiny_llms, stage1_export):
    ours = models["t5"]
    ref = Reference(ours, tiny_llms["t5"], stage1_export, "t5")
    pix = images(len(INSTRUCTIONS), seed=1)
    col = collator(ours, tiny_llms["t5"], stage1_export, "t5")
    b = batch(col, pix)
    with torch.no_grad():
        ref_loss, targets, tokens = ref.t5_forward(pix, INSTRUCTIONS, ANSWERS)
        loss = ours(b["image"], b["qformer_input_ids"], b["qformer_attention_mask"], b["input_ids"],
                    b["attention_mask"], b["labels"], b["decoder_attention_mask"]).loss
    q = ours.num_query_tokens
    assert torch.equal(b["input_ids"][:, q:], tokens.input_ids)
    assert torch.equal(b["labels"], targets)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    gen = col.generation_inputs(INSTRUCTIONS)
    kw = dict(num_beams=5, max_new_tokens=8, repetition_penalty=1.5, length_penalty=1.0)
    assert torch.equal(ours.new_tokens(ours.generate(pix, **gen, **kw), gen["input_ids"]),
                       ref.generate(pix, INSTRUCTIONS, **kw)[:, 1:])


def instruct_to_reference(model, family: str) -> dict[str, torch.Tensor]:
    """Our InstructBLIP written in the reference's released layout (`*_trimmed.pth`: Q-Former with its text
    parts, query_tokens, ln_vision, llm_proj / t5_proj; no ViT blocks, no LLM)."""
    from blip2_train.models.convert import ours_to_reference

    sd = {}
    for k, v in model.hf.state_dict().items():
        if k.startswith("language_model."):
            continue
        k = k.replace("qformer.embeddings.layernorm.", "qformer.layernorm.")
        k = k.replace("qformer.embeddings.word_embeddings.", "embeddings.word_embeddings.")
        k = k.replace("qformer.embeddings.position_embeddings.", "embeddings.position_embeddings.")
        sd["hf." + k] = v
    ref = ours_to_reference(sd, projection="llm" if family == "llama" else "t5")
    return {k: v for k, v in ref.items() if not k.startswith("visual_encoder.")}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_reference_instruct_pth_imports_to_the_same_loss(models, tiny_llms, stage1_export, tmp_path, family):
    from blip2_train.models.build_stage1 import checkpoint_stage
    from blip2_train.utils.errors import CheckpointError

    src = models[family]
    pth = tmp_path / f"instruct_blip_{family}_trimmed.pth"
    torch.save({"model": instruct_to_reference(src, family)}, pth)
    assert checkpoint_stage(pth) == 3
    with pytest.raises(CheckpointError, match="holds the ViT .*model.vision_checkpoint"):
        tiny_instruct(tiny_llms[family], family, instruct_checkpoint=str(pth), qformer_tokenizer=str(stage1_export))
    ours = tiny_instruct(tiny_llms[family], family, instruct_checkpoint=str(pth), vision_checkpoint=str(stage1_export),
                         qformer_tokenizer=str(stage1_export)).eval()
    b = batch(collator(ours, tiny_llms[family], stage1_export, family), images(4, seed=2))
    args = [b[k] for k in ("image", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask",
                           "labels")] + [b.get("decoder_attention_mask")]
    with torch.no_grad():
        torch.testing.assert_close(ours(*args).loss, src(*args).loss, rtol=0, atol=1e-6)
    # a key that fits nowhere is named
    bad = torch.load(pth, weights_only=False)
    bad["model"]["Qformer.bert.pooler.dense.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="fit nowhere in InstructBLIP.*pooler"):
        tiny_instruct(tiny_llms[family], family, instruct_checkpoint=str(tmp_path / "bad.pth"),
                      vision_checkpoint=str(stage1_export), qformer_tokenizer=str(stage1_export))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_export_generates_the_same_ids_in_plain_transformers(models, tiny_llms, stage1_export, tmp_path, family):
    from PIL import Image
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    import blip2_train
    from blip2_train.models.build_stage1 import checkpoint_stage
    from blip2_train.models.export import export_instruct

    ours = models[family]
    col = collator(ours, tiny_llms[family], stage1_export, family)
    out = export_instruct(ours, col.tok_in, col.qtok, tmp_path / "export", image_size=32,
                          generate_kwargs={"num_beams": 3})
    assert checkpoint_stage(out) == 3
    hf = InstructBlipForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = InstructBlipProcessor.from_pretrained(str(out))
    g = torch.Generator().manual_seed(3)
    pil = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in INSTRUCTIONS]
    inputs = processor(images=pil, text=INSTRUCTIONS, return_tensors="pt", padding=True)
    gen = col.generation_inputs(INSTRUCTIONS)
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(inputs[k], gen[k]), k  # the processor builds exactly what training generates from
    # ... but for the Q-Former: transformers pads its tokens on the LLM tokenizer's side (left for decoder-only
    # LLMs), which moves their position ids; the reference pads them on the right (docs/reference.md)
    q = processor.qformer_tokenizer(INSTRUCTIONS, padding=True, padding_side="right", truncation=True,
                                    max_length=MAX_TXT_LEN, return_tensors="pt")  # cut from the left, as saved
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
    for k in ("qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(inputs[k], gen[k]), k
    one = processor(images=pil[:1], text=INSTRUCTIONS[:1], return_tensors="pt")  # one instruction: no padding
    assert torch.equal(one["qformer_input_ids"], gen["qformer_input_ids"][:1, : one["qformer_input_ids"].shape[1]])
    kw = dict(num_beams=3, max_new_tokens=6, min_new_tokens=1, repetition_penalty=1.5)
    with torch.no_grad():
        theirs = hf.generate(**inputs, **kw)
    mine = ours.generate(inputs["pixel_values"], **gen, **kw)
    assert torch.equal(mine, theirs)
    # the API reads the same export: its texts are the decoded ids
    api = blip2_train.load(out, device="cpu")
    texts = api.generate(pil, INSTRUCTIONS, **kw)
    assert texts == [t.strip() for t in processor.batch_decode(ours.new_tokens(mine, gen["input_ids"]),
                                                                skip_special_tokens=True)]


def test_the_other_starts_land_their_weights(models, tiny_llms, stage1_export, tmp_path):
    """A reference stage-2 .pth (opt_proj) as the stage-2 start, and a transformers InstructBLIP directory (an
    export without blip2_train.json: what a saved Salesforce/instructblip-* is) as the instruct start."""
    from blip2_train.models.build_stage1 import checkpoint_stage
    from blip2_train.models.export import META, export_instruct
    from helpers.tiny import tiny_stage2

    src = tiny_stage2(tiny_llms["opt"], stage1_export, ln_vision_eps=1e-5, end_text="\n")
    with torch.no_grad():
        src.hf.language_projection.weight.add_(1.0)
    from blip2_train.models.convert import ours_to_reference

    torch.save({"model": ours_to_reference(src.state_dict(), projection="opt")}, tmp_path / "stage2_opt.pth")
    m = tiny_instruct(tiny_llms["opt"], "llama", stage2_checkpoint=str(tmp_path / "stage2_opt.pth"),
                      stage1_checkpoint=str(stage1_export), qformer_tokenizer=str(stage1_export))
    for k in ("language_projection.weight", "query_tokens", "vision_model.post_layernorm.weight",
              "qformer.encoder.layer.0.crossattention.attention.query.weight"):
        torch.testing.assert_close(m.hf.state_dict()[k], src.hf.state_dict()[k], rtol=0, atol=0, msg=k)
    # stage 1 brought the Q-Former's text parts (stage 2 has none): its word embeddings, not BERT's
    s1 = tiny_instruct(tiny_llms["opt"], "llama", stage1_checkpoint=str(stage1_export),
                       qformer_tokenizer=str(stage1_export))
    torch.testing.assert_close(m.hf.qformer.embeddings.word_embeddings.weight,
                               s1.hf.qformer.embeddings.word_embeddings.weight, rtol=0, atol=0)

    ours = models["t5"]
    col = collator(ours, tiny_llms["t5"], stage1_export, "t5")
    out = export_instruct(ours, col.tok_in, col.qtok, tmp_path / "official", image_size=32)
    (out / META).unlink()
    assert checkpoint_stage(out) == 3
    again = tiny_instruct(str(out), "t5", instruct_checkpoint=str(out),
                          qformer_tokenizer=str(out / "qformer_tokenizer")).eval()
    b = batch(col, images(4, seed=5))
    args = [b[k] for k in ("image", "qformer_input_ids", "qformer_attention_mask", "input_ids", "attention_mask",
                           "labels", "decoder_attention_mask")]
    with torch.no_grad():
        torch.testing.assert_close(again(*args).loss, ours(*args).loss, rtol=0, atol=1e-6)


def test_vicuna_tokens_on_an_llm_without_them_are_one_line(tiny_llms):
    """A new bos / eos would be an untrained row of the frozen head: refused, naming the setting."""
    from blip2_train.models.build_instruct import load_instruct_tokenizer
    from blip2_train.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"special_tokens .*bos_token.* not in this tokenizer's vocabulary"):
        load_instruct_tokenizer(tiny_llms["gpt2"], REFERENCE_SPECIALS)
    assert load_instruct_tokenizer(tiny_llms["gpt2"], None).eos_token == "<|endoftext|>"
