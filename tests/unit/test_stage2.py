"""Stage 2: stage-1 weights carried over, LLM families, label masks, image-token checks, parity with
transformers, export -> plain transformers generation, frozen parts untouched by training."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from helpers.tiny import TINY_VISION, tiny_stage1, tiny_stage2

FAMILIES = ["opt", "llama", "t5"]


def collator_for(model, llm_dir, prompt="", prefix_lm=False, max_txt_len=96):
    from blip2_train.data.collate import Stage2Collator
    from blip2_train.models.llm import load_llm_tokenizer

    tok = load_llm_tokenizer(llm_dir)
    return tok, Stage2Collator(tok, model.num_query_tokens, model.image_token_id, model.end_token_id, prompt,
                               max_txt_len, encoder_decoder=model.is_encoder_decoder, prefix_lm=prefix_lm)


def samples(n, seed=0, captions=None):
    g = torch.Generator().manual_seed(seed)
    caps = captions or ["a red circle in the top left", "there is a blue square at the bottom right",
                        "a green triangle", "the top right shows a yellow circle"]
    return [{"image": torch.randn(3, 32, 32, generator=g), "caption": caps[i % len(caps)], "image_id": i}
            for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_weights_arrive_unchanged(tiny_llms, stage1_export, family):
    from blip2_train.models.convert import load_hf_weights

    s1 = load_hf_weights(stage1_export)
    model = tiny_stage2(tiny_llms[family], stage1_export)
    own = model.hf.state_dict()
    carried = [k for k in s1 if k.startswith(("vision_model.", "qformer.", "query_tokens")) and k in own]
    assert len(carried) > 40
    for k in carried:
        torch.testing.assert_close(own[k].float(), s1[k].float(), rtol=0, atol=0, msg=k)
    # the text-only parts of the stage-1 Q-Former have no place in stage 2
    assert not any(k.startswith("embeddings.") or ".intermediate.dense" in k for k in own if "qformer" in k)


def test_stage1_from_reference_pth(tiny_llms, synth, tmp_path):
    from blip2_train.models.convert import ours_to_reference

    s1 = tiny_stage1(synth["tokenizer"], seed=5)
    torch.save({"model": ours_to_reference(s1.state_dict())}, tmp_path / "blip2_pretrained.pth")
    model = tiny_stage2(tiny_llms["opt"], tmp_path / "blip2_pretrained.pth")
    torch.testing.assert_close(model.hf.qformer.encoder.layer[0].crossattention.attention.query.weight,
                               s1.hf.qformer.encoder.layer[0].crossattention.attention.query.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.hf.query_tokens, s1.hf.query_tokens, rtol=0, atol=0)


def test_stage2_export_is_refused_as_stage1_source(tiny_llms, stage1_export, tmp_path):
    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer
    from blip2_train.utils.errors import CheckpointError

    model = tiny_stage2(tiny_llms["opt"], stage1_export)
    export_stage2(model, load_llm_tokenizer(tiny_llms["opt"]), tmp_path / "s2", 32)
    with pytest.raises(CheckpointError, match="stage-2"):
        tiny_stage2(tiny_llms["opt"], tmp_path / "s2")


def test_missing_llm_path_is_a_clear_error(tmp_path):
    from blip2_train.utils.errors import CheckpointError

    with pytest.raises(CheckpointError, match="not found: .*no_such_llm.*no model hub"):
        tiny_stage2(tmp_path / "no_such_llm")


def test_decoder_only_label_mask_position_by_position(tiny_llms):
    model = tiny_stage2(tiny_llms["opt"])
    tok, col = collator_for(model, tiny_llms["opt"], prompt="a photo of")
    caps = ["a red circle", "there is a blue square at the bottom right"]
    b = col(samples(2, captions=caps))
    q = model.num_query_tokens
    prompt_ids = tok("a photo of")["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id  # OPT-style BOS belongs to the prompt part
    for i, cap in enumerate(caps):
        full = tok(f"a photo of {cap}")["input_ids"] + [model.end_token_id]
        n = q + len(full)
        ids, labels, mask = b["input_ids"][i].tolist(), b["labels"][i].tolist(), b["attention_mask"][i].tolist()
        assert ids[:q] == [model.image_token_id] * q and ids[q:n] == full
        assert labels[: q + len(prompt_ids)] == [-100] * (q + len(prompt_ids))  # image tokens + BOS + prompt
        assert labels[q + len(prompt_ids): n] == full[len(prompt_ids):]  # caption + end token
        assert labels[n:] == [-100] * (len(labels) - n) and mask[n:] == [0] * (len(mask) - n)  # padding
        assert mask[:n] == [1] * n
        assert tok.decode(full[len(prompt_ids):-1]).strip() == cap


def test_llama_without_pad_token_keeps_eos_label(tiny_llms):
    """LLaMA tokenizers have no pad: we pad with unk; the eos ending each caption must stay a label."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tiny_llms["llama"])).pad_token is None
    model = tiny_stage2(tiny_llms["llama"])
    tok, col = collator_for(model, tiny_llms["llama"])
    assert tok.pad_token is not None
    b = col(samples(2, captions=["a red circle", "there is a blue square at the bottom right"]))
    for i in range(2):
        n = int(b["attention_mask"][i].sum())
        assert b["labels"][i, n - 1] == tok.eos_token_id == model.end_token_id
        assert (b["labels"][i, n:] == -100).all()
    assert model(b["image"], b["input_ids"], b["attention_mask"], b["labels"]).loss.isfinite()


def test_t5_prefix_lm_and_prompted_targets(tiny_llms):
    model = tiny_stage2(tiny_llms["t5"])
    tok, col = collator_for(model, tiny_llms["t5"], prefix_lm=True)
    caps = ["there is a blue square at the bottom right and a red circle in the top left"] * 6
    b = col(samples(6, captions=caps))
    q, cap_ids = model.num_query_tokens, tok(caps[0], add_special_tokens=False)["input_ids"]
    splits = set()
    for i in range(6):
        enc = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
        assert enc[:q] == [model.image_token_id] * q and enc[-1] == tok.eos_token_id
        head = enc[q:-1]
        target = [t for t in b["labels"][i].tolist() if t != -100]
        assert target[-1] == tok.eos_token_id and head + target[:-1] == cap_ids  # the split loses nothing
        words = tok.decode(head).split()  # split at a word, from the first to half of them
        assert 1 <= len(words) <= len(caps[0].split()) // 2 and caps[0].startswith(" ".join(words) + " ")
        splits.add(len(words))
    assert len(splits) > 1  # random split points
    _, col2 = collator_for(model, tiny_llms["t5"], prompt="a photo of")
    b2 = col2(samples(1, captions=caps))
    assert b2["input_ids"][0, q:].tolist() == tok("a photo of")["input_ids"]
    assert [t for t in b2["labels"][0].tolist() if t != -100] == cap_ids + [tok.eos_token_id]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_transformers_forward(tiny_llms, stage1_export, family):
    model = tiny_stage2(tiny_llms[family], stage1_export)
    model.eval()
    _, col = collator_for(model, tiny_llms[family], prompt="a photo of", prefix_lm=family == "t5")
    b = col(samples(3))
    ours = model(b["image"], b["input_ids"], b["attention_mask"], b["labels"], b.get("decoder_attention_mask")).loss
    ref = model.hf(pixel_values=b["image"], input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   labels=b["labels"], decoder_attention_mask=b.get("decoder_attention_mask")).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_lm_head_runs_only_at_labelled_positions_in_chunks(tiny_llms, stage1_export, family):
    """Decoder-only loss: the LM head sees only the rows whose shifted label exists (no image or prompt rows),
    in chunks under the byte budget; loss and every gradient equal transformers' forward over full logits."""
    model = tiny_stage2(tiny_llms[family], stage1_export)
    model.set_train_modes(True)
    _, col = collator_for(model, tiny_llms[family], prompt="a photo of")
    b = col(samples(3))
    vocab = model.llm.config.vocab_size
    model.logits_chunk_bytes = 5 * 4 * vocab  # 5 rows of fp32 logits per chunk
    seen = []
    hook = model.llm.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:-1]))
    ours = model(b["image"], b["input_ids"], b["attention_mask"], b["labels"])
    hook.remove()
    labelled = int((b["labels"][:, 1:] != -100).sum())
    assert labelled <= b["labels"].numel() - 3 * model.num_query_tokens  # image tokens, prompt, padding: none
    assert all(len(s) == 1 and s[0] <= 5 for s in seen) and sum(s[0] for s in seen) == labelled
    ours.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = model.hf(pixel_values=b["image"], input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   labels=b["labels"]).loss
    torch.testing.assert_close(ours.loss, ref, rtol=1e-5, atol=1e-6)
    ref.backward()
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and got
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_wrong_image_token_count_is_refused(tiny_llms):
    from blip2_train.utils.errors import DataError

    model = tiny_stage2(tiny_llms["opt"])
    _, col = collator_for(model, tiny_llms["opt"])
    b = col(samples(2))
    ids = b["input_ids"].clone()
    ids[1, 0] = ids[1, -1]  # one image token fewer in row 1
    with pytest.raises(DataError, match="row 1 has 3 image tokens.*expected 4"):
        model(b["image"], ids, b["attention_mask"], b["labels"])
    with pytest.raises(DataError, match="row 0 has 0 image tokens"):
        model.generate(b["image"], ids[:, model.num_query_tokens:], max_new_tokens=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_then_plain_transformers_generates_identical_ids(tiny_llms, stage1_export, synth, tmp_path, family):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2_train.data.annotations import read_annotations
    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    model = tiny_stage2(tiny_llms[family], stage1_export)
    with torch.no_grad():  # move off the init so a wrong weight would show
        model.hf.language_projection.weight.mul_(3.0)
    model.eval()
    tok, col = collator_for(model, tiny_llms[family], prompt="a photo of")
    export_stage2(model, load_llm_tokenizer(tiny_llms[family]), tmp_path / "export", 32, prompt="a photo of")
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    proc = Blip2Processor.from_pretrained(str(tmp_path / "export"))
    recs = read_annotations(synth["ann"]["test"], "karpathy")[:3]
    images = [Image.open(synth["root"] / r.image).convert("RGB") for r in recs]
    inputs = proc(images=images, text=["a photo of"] * 3, return_tensors="pt")
    ids, mask = col.generation_inputs(3)
    assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], mask)
    kw = dict(num_beams=3, max_new_tokens=8, min_new_tokens=3)
    ours = model.generate(inputs["pixel_values"], ids, mask, **kw)
    theirs = hf.generate(pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"],
                         attention_mask=inputs["attention_mask"], **kw)
    assert torch.equal(ours, theirs)
    assert model.new_tokens(ours, ids).shape[1] >= 3


def test_batched_left_padded_generation_equals_one_by_one(tiny_llms, stage1_export, tmp_path):
    from blip2_train.models.export import export_stage2
    from transformers import Blip2Processor

    from blip2_train.models.llm import load_llm_tokenizer

    model = tiny_stage2(tiny_llms["opt"], stage1_export).eval()
    export_stage2(model, load_llm_tokenizer(tiny_llms["opt"]), tmp_path / "e", 32)
    proc = Blip2Processor.from_pretrained(str(tmp_path / "e"))
    assert proc.tokenizer.padding_side == "left"
    prompts = ["a photo of", "a", "there is a green"]
    pix = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = proc.tokenizer(prompts, padding=True, return_tensors="pt")
    q = torch.full((3, model.num_query_tokens), model.image_token_id)
    ids = torch.cat([q, batch["input_ids"]], 1)
    mask = torch.cat([torch.ones_like(q), batch["attention_mask"]], 1)
    together = model.new_tokens(model.generate(pix, ids, mask, max_new_tokens=6, min_new_tokens=6), ids)
    for i, p in enumerate(prompts):
        one = proc.tokenizer([p], return_tensors="pt")["input_ids"]
        one_ids = torch.cat([q[:1], one], 1)
        alone = model.new_tokens(model.generate(pix[i:i + 1], one_ids, max_new_tokens=6, min_new_tokens=6), one_ids)
        assert torch.equal(together[i], alone[0]), p


def test_generate_refuses_max_length(tiny_llms):
    model = tiny_stage2(tiny_llms["opt"])
    _, col = collator_for(model, tiny_llms["opt"])
    ids, mask = col.generation_inputs(1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, 32, 32), ids, mask, max_length=10)


def test_flant5_refuses_fp16(tiny_llms):
    from blip2_train.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="float16"):
        tiny_stage2(tiny_llms["t5"], llm_dtype="float16")


def test_position_embeddings_interpolated_for_a_larger_image(tiny_llms, stage1_export):
    """Fine-tuning at a larger size (364 vs 224 px in the paper): 32 px -> 48 px here."""
    from blip2_train.models.vision import interpolate_position_embedding

    vis = {**TINY_VISION, "image_size": 48}
    model = tiny_stage2(tiny_llms["opt"], stage1_export, vision=vis)
    pe = model.hf.vision_model.embeddings.position_embedding
    assert pe.shape[1] == 1 + 36
    from blip2_train.models.convert import load_hf_weights

    src = load_hf_weights(stage1_export)["vision_model.embeddings.position_embedding"]
    torch.testing.assert_close(pe[:, 0], src[:, 0])
    torch.testing.assert_close(interpolate_position_embedding(src, 16), src)  # same grid: identity
    _, col = collator_for(model, tiny_llms["opt"])
    b = col(samples(1))
    assert model(torch.randn(1, 3, 48, 48), b["input_ids"], b["attention_mask"], b["labels"]).loss.isfinite()


def test_activation_checkpointing_gives_same_gradients(tiny_llms, stage1_export):
    ref = tiny_stage2(tiny_llms["opt"], stage1_export, freeze_vision=False)
    ckp = tiny_stage2(tiny_llms["opt"], stage1_export, freeze_vision=False,
                      activation_checkpointing={"vision": True, "qformer": True, "llm": True})
    _, col = collator_for(ref, tiny_llms["opt"])
    b = col(samples(2))
    grads = []
    for m in (ref, ckp):
        m.train()
        m.llm.eval()
        m(b["image"], b["input_ids"], b["attention_mask"], b["labels"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("vision_model.encoder" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_layer_decay_scales_reach_the_optimizer(tiny_llms):
    from blip2_train.lit.stage2 import Stage2Module

    model = tiny_stage2(tiny_llms["opt"], freeze_vision=False)
    module = Stage2Module(model, lr=1e-3, max_steps=10, vision_layer_decay=0.5, warmup_steps=0)
    opt = module.configure_optimizers()["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    vm = model.hf.vision_model
    assert lr_of[id(vm.encoder.layers[1].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(vm.encoder.layers[0].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.25)
    assert lr_of[id(vm.embeddings.patch_embedding.weight)] == pytest.approx(1e-3 * 0.125)
    assert lr_of[id(model.hf.language_projection.weight)] == pytest.approx(1e-3)


def test_training_moves_only_the_trainable_parts(tiny_llms, stage1_export, synth):
    import lightning as L

    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.lit.stage2 import Stage2Module

    model = tiny_stage2(tiny_llms["opt"], stage1_export)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm = Blip2DataModule(str(tiny_llms["opt"]), [{"name": "s", "urls": str(synth["train_shards"])}], batch_size=8,
                         num_workers=0, image_size=32, hflip=False, samples_per_epoch=64, max_txt_len=64,
                         text={"kind": "llm", "num_query_tokens": 4, "prompt": "a photo of"})
    module = Stage2Module(model, lr=1e-2, warmup_steps=0, max_steps=3)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("hf.language_model.", "hf.vision_model.encoder.",
                                                  "hf.vision_model.embeddings."))]
    trained = [k for k in before if k.startswith(("hf.qformer.encoder.layer.0.crossattention.", "hf.query_tokens",
                                                   "hf.language_projection.", "hf.vision_model.post_layernorm."))]
    assert len(frozen) > 20 and len(trained) > 5
    for k in frozen:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    for k in trained:
        assert not torch.equal(before[k], after[k]), f"trainable {k} did not move"
    assert not model.llm.training  # frozen LLM kept in eval mode (no dropout) during training


def test_stage2_result_feeds_finetuning_and_evaluation(tiny_llms, stage1_export, tmp_path):
    """A stage-2 export is both the LLM source (model.llm) and the stage-2 weights (model.stage2_checkpoint)
    of caption fine-tuning or evaluation, as an official Salesforce/blip2-* directory would be."""
    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    src = tiny_stage2(tiny_llms["llama"], stage1_export)
    with torch.no_grad():
        src.hf.language_projection.weight.normal_()
    export_stage2(src, load_llm_tokenizer(tiny_llms["llama"]), tmp_path / "s2", 32, prompt="a photo of")
    ft = tiny_stage2(tmp_path / "s2", stage2_checkpoint=str(tmp_path / "s2"), freeze_vision=False, seed=99)
    a, b = src.state_dict(), ft.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(p.requires_grad for p in ft.hf.vision_model.encoder.parameters())  # fine-tuning unfreezes the ViT


def test_bf16_export_loads_in_bf16_by_default(tiny_llms, stage1_export, tmp_path):
    """config.json records the frozen LLM's dtype: plain `from_pretrained` loads a bf16 export in bf16 (at real
    size 7.9 GiB instead of 21.3 GiB upcast to fp32), with the same tensors."""
    from transformers import Blip2ForConditionalGeneration

    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    model = tiny_stage2(tiny_llms["opt"], stage1_export, llm_dtype="bfloat16", vision_dtype="bfloat16")
    export_stage2(model, load_llm_tokenizer(tiny_llms["opt"]), tmp_path / "e", image_size=32)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "e"))
    assert hf.language_model.dtype == torch.bfloat16 and hf.config.dtype == torch.bfloat16
    w = "model.decoder.layers.0.fc1.weight"
    assert torch.equal(hf.language_model.state_dict()[w], model.llm.state_dict()[w])
