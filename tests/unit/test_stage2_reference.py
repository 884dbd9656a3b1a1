"""Stage 2 held to the reference (LAVIS `Blip2OPT` / `Blip2T5`): its stage-2 `.pth` files load wherever a
stage-2 start is accepted, and on identical weights our labels, losses and beam-search ids equal those of a
literal transcription of its forward / generate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from helpers.tiny import tiny_stage1, tiny_stage2

MAX_TXT_LEN = 56  # the tiny tokenizers are nearly character-level: only the long caption below is cut
CAPTIONS = ["a red circle", "there is a blue square at the bottom right next to a small green triangle",
            "a green triangle", "the top right shows a yellow circle"]
FAMILY_KW = {"opt": dict(end_text="\n"), "t5": dict(llm_config={"dense_act_fn": "gelu"})}  # stage2_opt / _flant5


def make_reference_pth(model, family: str, path, vision: bool = True):
    """A stage-2 model written in the reference's layout: visual_encoder.*, ln_vision.*, query_tokens,
    Qformer.bert.*, opt_proj.* / t5_proj.*; no LLM."""
    from blip2_train.models.convert import ours_to_reference

    sd = ours_to_reference(model.state_dict(), projection=family)
    assert any(k.startswith(f"{family}_proj.") for k in sd) and not any("language_model" in k for k in sd)
    if not vision:
        sd = {k: v for k, v in sd.items() if not k.startswith("visual_encoder.")}
    torch.save({"model": sd}, path)
    return path


def trained_like(llm_dir, stage1_export, family):
    """A stage-2 model off its init (so that a weight landing in the wrong place would show)."""
    m = tiny_stage2(llm_dir, stage1_export, ln_vision_eps=1e-5, **FAMILY_KW[family])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in (m.hf.language_projection.weight, m.hf.query_tokens, m.hf.vision_model.post_layernorm.weight):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def reference_files(tiny_llms, stage1_export, tmp_path_factory):
    d = tmp_path_factory.mktemp("reference_pth")
    out = {}
    for fam in ("opt", "t5"):
        src = trained_like(tiny_llms[fam], stage1_export, fam)
        out[fam] = (make_reference_pth(src, fam, d / f"blip2_pretrained_{fam}.pth"), src)
    return out


# --- a literal transcription of the reference's stage-2 text handling ------------------------------------


class Reference:
    """LAVIS `Blip2OPT.forward` / `generate` and `Blip2T5.forward` / `generate`, line by line, on transformers'
    OPTForCausalLM / T5ForConditionalGeneration loaded from the LLM directory as the reference loads them
    (T5 with dense_act_fn="gelu"). ln_vision (eps 1e-5), query_tokens and opt_proj / t5_proj are read from the
    reference-layout .pth; the ViT blocks and the Q-Former are transformers modules (their key maps are held
    to the reference by the stage-1 tests)."""

    def __init__(self, pth, llm_dir, family, tower, prompt="", max_txt_len=32):
        from transformers import AutoTokenizer, OPTForCausalLM, T5Config, T5ForConditionalGeneration

        ref = torch.load(pth, weights_only=False)["model"]
        self.family, self.prompt, self.max_txt_len = family, prompt, max_txt_len
        self.visual_encoder, self.Qformer = copy.deepcopy(tower.hf.vision_model), copy.deepcopy(tower.hf.qformer)
        self.ln_vision = nn.LayerNorm(ref["ln_vision.weight"].shape[0], eps=1e-5)
        self.ln_vision.load_state_dict({"weight": ref["ln_vision.weight"], "bias": ref["ln_vision.bias"]})
        self.query_tokens = ref["query_tokens"]
        w = ref[f"{family}_proj.weight"]
        self.proj = nn.Linear(w.shape[1], w.shape[0])
        self.proj.load_state_dict({"weight": w, "bias": ref[f"{family}_proj.bias"]})
        self.tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
        if family == "opt":
            self.llm = OPTForCausalLM.from_pretrained(str(llm_dir)).eval()
            self.eos_token_id = self.tokenizer("\n", add_special_tokens=False).input_ids[0]
            self.prompt_length = self.tokenizer(self.prompt, return_tensors="pt").attention_mask.sum(1)
        else:
            cfg = T5Config.from_pretrained(str(llm_dir))
            cfg.dense_act_fn = "gelu"
            self.llm = T5ForConditionalGeneration.from_pretrained(str(llm_dir), config=cfg).eval()

    def visual_prompt(self, image):
        x = self.visual_encoder.embeddings(image)
        image_embeds = self.ln_vision(self.visual_encoder.encoder(inputs_embeds=x).last_hidden_state)
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.Qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_atts)
        inputs = self.proj(out.last_hidden_state)
        return inputs, torch.ones(inputs.size()[:-1], dtype=torch.long)

    def opt_forward(self, image, text_input):
        inputs_opt, atts_opt = self.visual_prompt(image)
        self.tokenizer.padding_side = "right"
        text = [t + "\n" for t in text_input]
        opt_tokens = self.tokenizer(text, return_tensors="pt", padding="longest", truncation=True,
                                    max_length=self.max_txt_len)
        targets = opt_tokens.input_ids.masked_fill(opt_tokens.input_ids == self.tokenizer.pad_token_id, -100)
        if self.prompt:
            targets[:, : self.prompt_length] = -100  # do not apply loss to the prompt
        empty_targets = torch.ones(atts_opt.size(), dtype=torch.long).fill_(-100)
        targets = torch.cat([empty_targets, targets], dim=1)
        inputs_embeds = self.llm.model.decoder.embed_tokens(opt_tokens.input_ids)
        inputs_embeds = torch.cat([inputs_opt, inputs_embeds], dim=1)
        attention_mask = torch.cat([atts_opt, opt_tokens.attention_mask], dim=1)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True, labels=targets)
        return out.loss, targets, opt_tokens

    def t5_forward(self, image, text_input, text_output):
        inputs_t5, atts_t5 = self.visual_prompt(image)
        input_tokens = self.tokenizer(text_input, padding="longest", truncation=True, max_length=self.max_txt_len,
                                      return_tensors="pt")
        output_tokens = self.tokenizer(text_output, padding="longest", truncation=True, max_length=self.max_txt_len,
                                       return_tensors="pt")
        encoder_atts = torch.cat([atts_t5, input_tokens.attention_mask], dim=1)
        targets = output_tokens.input_ids.masked_fill(output_tokens.input_ids == self.tokenizer.pad_token_id, -100)
        inputs_embeds = self.llm.encoder.embed_tokens(input_tokens.input_ids)
        inputs_embeds = torch.cat([inputs_t5, inputs_embeds], dim=1)
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=encoder_atts,
                       decoder_attention_mask=output_tokens.attention_mask, return_dict=True, labels=targets)
        return out.loss, targets, input_tokens

    @torch.no_grad()
    def generate(self, image, **kw):
        """Beam search as the reference (its `max_length` -> `max_new_tokens`, as we always pass)."""
        inputs, atts = self.visual_prompt(image)
        prompt = [self.prompt] * image.size(0)
        tokens = self.tokenizer(prompt, return_tensors="pt", padding="longest")
        attention_mask = torch.cat([atts, tokens.attention_mask], dim=1)
        inputs_embeds = torch.cat([inputs, self.llm.get_input_embeddings()(tokens.input_ids)], dim=1)
        extra = {"eos_token_id": self.eos_token_id} if self.family == "opt" else {}
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kw, **extra)


def images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def ours_from_pth(tiny_llms, pth, family, **kw):
    """Our model through the user's path: model.stage2_checkpoint = the reference .pth, model.llm = the LLM."""
    m = tiny_stage2(tiny_llms[family], stage2_checkpoint=str(pth), ln_vision_eps=1e-5, **FAMILY_KW[family], **kw)
    return m.eval()


def collator(model, llm_dir, prompt, prefix_lm=False, **kw):
    from blip2_train.data.collate import Stage2Collator
    from blip2_train.models.llm import load_llm_tokenizer

    return Stage2Collator(load_llm_tokenizer(llm_dir), model.num_query_tokens, model.image_token_id,
                          model.end_token_id, prompt, MAX_TXT_LEN, encoder_decoder=model.is_encoder_decoder,
                          prefix_lm=prefix_lm, **kw)


def batch(col, pix):
    return col([{"image": pix[i], "caption": c, "image_id": i} for i, c in enumerate(CAPTIONS)], key=(0, 0, 0))


# --- loading the reference's stage-2 files --------------------------------------------------------------


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_reference_stage2_pth_lands_everywhere(tiny_llms, reference_files, family):
    pth, src = reference_files[family]
    ours = ours_from_pth(tiny_llms, pth, family)
    a, b = src.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    vm = ours.hf.vision_model
    assert vm.post_layernorm.eps == 1e-5 and vm.encoder.layers[0].layer_norm1.eps == 1e-6  # ln_vision vs blocks


def test_wrong_stage_or_llm_is_refused_with_one_line(tiny_llms, reference_files, synth, stage1_export, tmp_path):
    from blip2_train.models.convert import ours_to_reference
    from blip2_train.utils.errors import CheckpointError

    opt_pth, src = reference_files["opt"]
    with pytest.raises(CheckpointError, match="stage-2 reference checkpoint .*pass it as model.stage2_checkpoint"):
        tiny_stage2(tiny_llms["opt"], opt_pth)
    with pytest.raises(CheckpointError, match="holds opt_proj.* but model.llm is of model_type t5"):
        ours_from_pth(tiny_llms, opt_pth, "t5")
    with pytest.raises(CheckpointError, match="holds t5_proj.* but model.llm is of model_type opt"):
        ours_from_pth(tiny_llms, reference_files["t5"][0], "opt")
    s1 = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": ours_to_reference(tiny_stage1(synth["tokenizer"]).state_dict())}, s1)
    with pytest.raises(CheckpointError, match="stage-1 reference checkpoint .*paths.stage1_checkpoint"):
        ours_from_pth(tiny_llms, s1, "opt")
    with pytest.raises(CheckpointError, match="is a file, not a transformers directory .*llm_dir"):
        tiny_stage2(opt_pth, stage2_checkpoint=str(opt_pth))
    # the reference saves trained weights only: a file without the frozen ViT needs it from elsewhere
    no_vit = make_reference_pth(src, "opt", tmp_path / "no_vit.pth", vision=False)
    with pytest.raises(CheckpointError, match="no visual_encoder.*model.vision_checkpoint"):
        ours_from_pth(tiny_llms, no_vit, "opt")
    m = tiny_stage2(tiny_llms["opt"], stage1_export, stage2_checkpoint=str(no_vit), ln_vision_eps=1e-5, end_text="\n")
    torch.testing.assert_close(m.hf.language_projection.weight, src.hf.language_projection.weight, rtol=0, atol=0)


# --- labels, losses and beam search against the reference --------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_opt_matches_the_reference(tiny_llms, reference_files, prompt):
    pth, _ = reference_files["opt"]
    ours = ours_from_pth(tiny_llms, pth, "opt")
    ref = Reference(pth, tiny_llms["opt"], "opt", ours, prompt=prompt, max_txt_len=MAX_TXT_LEN)
    assert ours.end_token_id == ref.eos_token_id
    pix = images(len(CAPTIONS))
    b = batch(collator(ours, tiny_llms["opt"], prompt), pix)
    text_input = [f"{prompt} {c}" if prompt else c for c in CAPTIONS]  # the text processor's prompt + caption
    with torch.no_grad():
        ref_loss, targets, tokens = ref.opt_forward(pix, text_input)
        loss = ours(b["image"], b["input_ids"], b["attention_mask"], b["labels"]).loss
    q = ours.num_query_tokens
    assert torch.equal(b["labels"], targets)  # position by position, queries and padding included
    assert torch.equal(b["input_ids"][:, q:], tokens.input_ids)
    assert torch.equal(b["attention_mask"][:, q:], tokens.attention_mask)
    # the rule itself: BOS after the queries a target only without a prompt; the long caption loses "\n"
    assert (b["labels"][:, q] != -100).all() if not prompt else (b["labels"][:, q] == -100).all()
    assert b["input_ids"].shape[1] == q + MAX_TXT_LEN and ours.end_token_id not in b["input_ids"][1].tolist()
    assert ours.end_token_id in b["labels"][0].tolist()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)

    ids, mask = collator(ours, tiny_llms["opt"], prompt).generation_inputs(len(CAPTIONS))
    kw = dict(num_beams=5, max_new_tokens=10, min_new_tokens=4)
    mine = ours.new_tokens(ours.generate(pix, ids, mask, **kw), ids)
    theirs = ref.generate(pix, **kw)
    assert torch.equal(mine, theirs)


def test_opt_deviations_are_named_options(tiny_llms, reference_files):
    pth, _ = reference_files["opt"]
    ours = ours_from_pth(tiny_llms, pth, "opt")
    q = ours.num_query_tokens
    b = batch(collator(ours, tiny_llms["opt"], "", mask_bos_without_prompt=True, keep_end_token=True), images(4))
    assert (b["labels"][:, q] == -100).all()  # BOS never a target
    for i in range(len(CAPTIONS)):  # every row ends with the end token, the long one too
        n = int(b["attention_mask"][i].sum())
        assert b["input_ids"][i, n - 1] == b["labels"][i, n - 1] == ours.end_token_id


@pytest.mark.parametrize("prefix_lm", [True, False])
def test_flant5_matches_the_reference(tiny_llms, reference_files, prefix_lm):
    pth, _ = reference_files["t5"]
    ours = ours_from_pth(tiny_llms, pth, "t5")
    assert ours.llm.config.dense_act_fn == "gelu"
    prompt = "a photo of"
    ref = Reference(pth, tiny_llms["t5"], "t5", ours, prompt=prompt, max_txt_len=MAX_TXT_LEN)
    col = collator(ours, tiny_llms["t5"], prompt, prefix_lm=prefix_lm)
    pix = images(len(CAPTIONS))
    b = batch(col, pix)
    q, tok = ours.num_query_tokens, ref.tokenizer
    if prefix_lm:  # recover each row's split from its encoder text: a word boundary, 1 .. half of the words
        text_input = [tok.decode(r[q:][m[q:].bool()], skip_special_tokens=True).strip()
                      for r, m in zip(b["input_ids"], b["attention_mask"])]
        text_output = []
        for head, cap in zip(text_input, CAPTIONS):
            words = cap.split()
            k = len(head.split())
            assert 1 <= k <= max(1, len(words) // 2) and " ".join(words[:k]) == head
            text_output.append(" ".join(words[k:]))
    else:
        text_input, text_output = [prompt] * len(CAPTIONS), CAPTIONS
    with torch.no_grad():
        ref_loss, targets, enc = ref.t5_forward(pix, text_input, text_output)
        loss = ours(b["image"], b["input_ids"], b["attention_mask"], b["labels"], b["decoder_attention_mask"]).loss
    assert torch.equal(b["labels"], targets)
    assert torch.equal(b["decoder_attention_mask"], (targets != -100).long())
    assert torch.equal(b["input_ids"][:, q:], enc.input_ids)
    assert torch.equal(b["attention_mask"][:, q:], enc.attention_mask)
    assert b["labels"].shape[1] <= MAX_TXT_LEN and (b["labels"] == tok.eos_token_id).sum(1).tolist() == [1] * 4
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    if not prefix_lm:
        ids, mask = col.generation_inputs(len(CAPTIONS))
        kw = dict(num_beams=5, max_new_tokens=8, min_length=3)
        assert torch.equal(ours.generate(pix, ids, mask, **kw), ref.generate(pix, **kw))


def test_prefix_split_draws_every_point_from_one_to_the_middle(tiny_llms, reference_files):
    import random

    ours = ours_from_pth(tiny_llms, reference_files["t5"][0], "t5")
    col = collator(ours, tiny_llms["t5"], "", prefix_lm=True)
    cap = CAPTIONS[1]
    n = len(cap.split())
    ks = {len(col.prefix_split(cap, random.Random(s))[0].split()) for s in range(300)}
    assert ks == set(range(1, n // 2 + 1))
    assert col.prefix_split("circle", random.Random(0)) == ("circle", "")


# --- the user's path: fine-tuning, evaluation and export from the command line ----------------------------


def test_reference_pth_through_finetune_eval_and_export(tiny_llms, synth, tmp_path, capsys):
    """`blip2_caption_opt2.7b.pth` + a local OPT directory, at tiny size: caption fine-tuning, captioning
    evaluation and export (of the fine-tuned run and of the .pth itself), each from its console script."""
    from hydra.utils import instantiate
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2_train.config.compose import compose
    from blip2_train.data.annotations import read_annotations
    from helpers.procs import cli

    opt = tiny_llms["opt"]
    tiny = ["arch=tiny", f"paths.llm_dir={opt}", "data.image_size=32", "arch.ln_vision_eps=1.0e-5"]

    def build(pth):
        over = ["experiment=caption_coco_ft", f"paths.stage2_checkpoint={pth or 'null'}", *tiny]
        return instantiate(compose("train", over).model)

    src = build(None)
    with torch.no_grad():
        src.hf.language_projection.weight.normal_(0, 0.5)
    pth = make_reference_pth(src, "opt", tmp_path / "blip2_caption_opt.pth")
    data = ["preset=tiny", f"paths.data_dir={synth['dir']}", "data.eval_set.limit=6", "data.num_workers=0"]

    r = cli("experiment=caption_coco_ft", f"paths.stage2_checkpoint={pth}", *tiny, *data,
            "data.batch_size=4", "data.samples_per_epoch=16",
            "trainer=cpu", "trainer.precision=32-true", "strategy=auto", "logger=none", "callbacks.progress=null",
            "trainer.max_steps=2", "module.max_steps=2", "module.warmup_steps=1", "eval.enabled=false",
            f"paths.output_dir={tmp_path / 'ft'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("experiment=caption_coco_eval", f"paths.stage2_checkpoint={pth}", *tiny, *data, "data.eval_batch_size=3",
            "eval.generate.num_beams=2", "eval.generate.max_new_tokens=5", "eval.generate.min_new_tokens=1",
            "+eval.spice=false", f"paths.output_dir={tmp_path / 'eval'}", tool="evaluate")
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    preds = json.loads((tmp_path / "eval" / "captions_predictions.json").read_text())
    assert metrics["num_images"] == 6 and "cider" in metrics and len(preds) == 6

    # the fine-tuned run exports; the .pth exports directly, given the LLM directory
    from blip2_train.cli.export import main as export

    assert export([str(tmp_path / "ft" / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "exp_ft")]) == 0
    assert export([str(pth), "--llm", str(opt), "--prompt", "a photo of", "--out", str(tmp_path / "exp_ref"),
                   "arch=tiny", "arch.ln_vision_eps=1.0e-5"]) == 0
    assert Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "exp_ft")).config.num_query_tokens == 8
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "exp_ref")).eval()
    proc = Blip2Processor.from_pretrained(str(tmp_path / "exp_ref"))
    recs = read_annotations(synth["ann"]["test"], "karpathy")[:3]
    inputs = proc(images=[Image.open(synth["root"] / x.image).convert("RGB") for x in recs],
                  text=["a photo of"] * 3, return_tensors="pt")
    ours = build(pth).eval()
    kw = dict(num_beams=5, max_new_tokens=8, min_new_tokens=3)
    mine = ours.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **kw)
    theirs = hf.generate(**inputs, **kw)
    assert torch.equal(mine, theirs)
    assert hf.language_model.config.eos_token_id == ours.end_token_id
    # a wrong-LLM file is one line at the command line too
    capsys.readouterr()
    assert export([str(pth), "--llm", str(tiny_llms["t5"]), "--out", str(tmp_path / "bad"), "arch=tiny"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "opt_proj" in line and "model_type t5" in line


def test_reference_defaults_in_the_configs(tiny_llms):
    """stage2_opt / stage2_flant5 are the reference unless an option says otherwise; the frozen LLM trains with
    its dropout on (the reference's model.train() reaches it) unless model.llm_dropout=false."""
    from blip2_train.config.compose import compose

    for name, extra in (("stage2_opt", {}), ("stage2_flant5", {"dense_act_fn": "gelu"})):
        m = compose("train", ["experiment=stage2_pretrain", f"model={name}", "paths.llm_dir=x",
                              "paths.stage1_checkpoint=null"]).model
        assert m.ln_vision_eps == 1e-5 and m.vision.layer_norm_eps == 1e-6 and m.llm_dropout is True
        assert not m.text.mask_bos_without_prompt and not m.text.keep_end_token and dict(m.llm_config) == extra
    for dropout in (True, False):
        model = tiny_stage2(tiny_llms["opt"], llm_dropout=dropout)
        model.set_train_modes(True)
        assert model.llm.training is dropout and model.hf.qformer.training
        assert not model.hf.vision_model.encoder.training  # a frozen ViT never trains (the reference's too)
        model.set_train_modes(False)
        assert not model.llm.training


def test_flant5_pth_exports_with_the_references_activation(tiny_llms, reference_files, synth, tmp_path):
    """blip2-export of a t5_proj file: the export's T5 config carries dense_act_fn=gelu, so plain transformers
    generates what our model (and the reference) generate."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2_train.cli.export import main as export
    from blip2_train.data.annotations import read_annotations

    pth, _ = reference_files["t5"]
    sizes = ["arch.vision.hidden_size=32", "arch.vision.intermediate_size=64", "arch.qformer.hidden_size=32",
             "arch.qformer.intermediate_size=64", "arch.num_query_tokens=4"]
    assert export([str(pth), "--llm", str(tiny_llms["t5"]), "--prompt", "a photo of", "--out", str(tmp_path / "e"),
                   "arch=tiny", "arch.ln_vision_eps=1.0e-5",  # stage2_flant5 (picked by t5_proj) sets gelu
                   *sizes]) == 0
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "e")).eval()
    assert hf.config.text_config.dense_act_fn == "gelu"
    proc = Blip2Processor.from_pretrained(str(tmp_path / "e"))
    recs = read_annotations(synth["ann"]["test"], "karpathy")[:3]
    inputs = proc(images=[Image.open(synth["root"] / x.image).convert("RGB") for x in recs],
                  text=["a photo of"] * 3, return_tensors="pt")
    ours = ours_from_pth(tiny_llms, pth, "t5")
    kw = dict(num_beams=5, max_new_tokens=8, min_new_tokens=3)
    assert torch.equal(ours.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **kw),
                       hf.generate(**inputs, **kw))
