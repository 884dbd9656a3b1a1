"""Checkpoints in and out: transformers export parity, reference .pth import, BERT and BLIP-2 vision init."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForMaskedLM, Blip2ForImageTextRetrieval, Blip2Processor

import pytest

from blip2_train.models import convert
from blip2_train.models.build_stage1 import init_qformer_from_bert, init_vision_from, load_stage1_weights
from blip2_train.models.export import export_stage1
from blip2_train.utils.errors import CheckpointError
from helpers.tiny import batch_of, tiny_stage1

CAPS = ["a red circle in the top left", "a blue square at the bottom right", "a green triangle"]


def perturb(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_export_loads_in_transformers_with_equal_itc_and_itm(tmp_path, tiny_model, tokenizer):
    perturb(tiny_model)  # trained-looking weights, not the init
    out = export_stage1(tiny_model, tokenizer, tmp_path / "export", image_size=32)
    hf = Blip2ForImageTextRetrieval.from_pretrained(str(out), attn_implementation="eager").eval()
    proc = Blip2Processor.from_pretrained(str(out))
    assert proc.tokenizer.bos_token == "[DEC]" and "<image>" not in tokenizer.get_vocab()  # caller's untouched
    x, ids, mask = batch_of(tokenizer, CAPS)
    tiny_model.eval()
    with torch.no_grad():
        itc_hf = hf(pixel_values=x, input_ids=ids, attention_mask=mask).logits_per_image
        itm_hf = hf(pixel_values=x, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image
        ie, feats = tiny_model.retrieval_image_embeds(x)
        txt = tiny_model.retrieval_text_feat(ids, mask)
        itc_ours = torch.einsum("iqd,td->iqt", feats, txt).amax(1)
        itm_ours = tiny_model.itm_forward(ie, ids, mask)
    torch.testing.assert_close(itc_hf, itc_ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(itm_hf, itm_ours, atol=1e-5, rtol=1e-4)
    # processor pixels == our eval transform (bicubic resize + CLIP normalisation)
    from PIL import Image

    from blip2_train.data.transforms import EvalTransform

    img = Image.new("RGB", (50, 40), (200, 30, 90))
    px = proc.image_processor(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(px, EvalTransform(32)(img), atol=0.03, rtol=0)

    # resume from the export: lm head and temp come back too
    again = tiny_stage1(tokenizer.name_or_path, seed=99)
    load_stage1_weights(again, out)
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_reference_pth_round_trip(tmp_path, tiny_model, tokenizer):
    perturb(tiny_model, seed=3)
    with torch.no_grad():  # the reference's ViT has q and v biases only: no k bias to carry
        for layer in tiny_model.hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = 0
    ref = convert.ours_to_reference(tiny_model.state_dict())
    assert "visual_encoder.blocks.0.attn.q_bias" in ref and "Qformer.cls.predictions.transform.dense.weight" in ref
    assert "Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in ref and "temp" in ref
    ref["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]  # present in real files, ignored
    torch.save({"model": ref}, tmp_path / "blip2_pretrained.pth")
    fresh = tiny_stage1(tokenizer.name_or_path, seed=123)
    load_stage1_weights(fresh, tmp_path / "blip2_pretrained.pth")
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v, msg=k)
    # the qkv bias is cat(q_bias, 0, v_bias): the k part really is zero after import
    b = fresh.state_dict()["hf.vision_model.encoder.layers.0.self_attn.qkv.bias"]
    assert torch.count_nonzero(b[32:64]) == 0


def test_unmatched_reference_keys_are_reported(tmp_path, tiny_model):
    ref = convert.ours_to_reference(tiny_model.state_dict())
    ref["some_new_head.weight"] = torch.zeros(2)
    torch.save({"model": ref}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="some_new_head.weight"):
        load_stage1_weights(tiny_model, tmp_path / "x.pth")


def test_qformer_from_local_bert_dir(tmp_path, tokenizer):
    bert_cfg = BertConfig(vocab_size=len(tokenizer) - 1, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    bert = BertForMaskedLM(bert_cfg)
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = tiny_stage1(tokenizer.name_or_path)
    init_qformer_from_bert(model, tmp_path / "bert")
    sd = model.state_dict()
    bsd = bert.state_dict()
    n = bsd["bert.embeddings.word_embeddings.weight"].shape[0]
    torch.testing.assert_close(sd["hf.embeddings.word_embeddings.weight"][:n], bsd["bert.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(sd["hf.qformer.layernorm.weight"], bsd["bert.embeddings.LayerNorm.weight"])
    torch.testing.assert_close(sd["hf.qformer.encoder.layer.1.attention.attention.query.weight"],
                               bsd["bert.encoder.layer.1.attention.self.query.weight"])
    # query FFN starts as a copy of the text FFN
    torch.testing.assert_close(sd["hf.qformer.encoder.layer.0.intermediate_query.dense.weight"],
                               bsd["bert.encoder.layer.0.intermediate.dense.weight"])
    torch.testing.assert_close(sd["lm_head.predictions.transform.dense.weight"], bsd["cls.predictions.transform.dense.weight"])
    assert model.lm_head.predictions.decoder.weight is model.hf.embeddings.word_embeddings.weight


def test_vision_from_local_blip2_dir_really_loads(tmp_path, tiny_model, tokenizer):
    perturb(tiny_model, seed=8)
    tiny_model.hf.save_pretrained(tmp_path / "blip2")
    fresh = tiny_stage1(tokenizer.name_or_path, seed=77)
    before = fresh.hf.vision_model.encoder.layers[0].mlp.fc1.weight.clone()
    init_vision_from(fresh, tmp_path / "blip2")
    after = fresh.hf.vision_model.encoder.layers[0].mlp.fc1.weight
    assert not torch.equal(before, after)
    for k, v in tiny_model.hf.vision_model.state_dict().items():
        torch.testing.assert_close(fresh.hf.vision_model.state_dict()[k], v, msg=k)


def test_wrong_paths_fail_clearly(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not found"):
        init_vision_from(tiny_model, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_stage1_weights(tiny_model, tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        init_vision_from(tiny_model, tmp_path / "empty")


def test_training_keeps_the_last_three_periodic_checkpoints_trainable_weights_only(synth, tmp_path):
    """Through blip2-train with the default callbacks: a save every step keeps only the newest 3 step files plus
    last.ckpt (not one file per save), and each holds the trainable weights, not the frozen ViT."""
    import subprocess
    import sys

    from helpers.tiny import tiny_cli
    from helpers.procs import REPO, clean_env

    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
         *tiny_cli(synth, "trainer.max_steps=6", "module.max_steps=6", "data.batch_size=4",
                   "data.samples_per_epoch=64", "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0",
                   "callbacks.model_checkpoint.every_n_train_steps=1", f"paths.output_dir={out}")],
        cwd=REPO, env=clean_env(), timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step0000004.ckpt", "step0000005.ckpt", "step0000006.ckpt"], names
    ckpt = torch.load(out / "checkpoints" / "step0000006.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["frozen_weights_omitted"] and ckpt["global_step"] == 6
    keys = ckpt["state_dict"].keys()
    assert "model.hf.vision_model.post_layernorm.weight" in keys
    assert not any(k.startswith("model.hf.vision_model.encoder.") for k in keys)


def test_weights_snapshots_on_two_ranks_under_accumulation_export_like_checkpoints(synth, tmp_path):
    """`callbacks.weights_snapshot.every_n_steps=2` through blip2-train on 2 processes (torchrun, gloo DDP) with
    gradient accumulation 2 (the callback sees each step twice): one file per snapshot step, written once,
    holding the trainable weights only, in bf16, equal to the checkpoint of the same step, a fraction of its
    size, and blip2-export turns one into a transformers directory."""
    import socket
    import subprocess
    import sys

    from helpers.tiny import tiny_cli
    from helpers.procs import REPO, clean_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
         *tiny_cli(synth, "trainer.devices=2", "+strategy.process_group_backend=gloo", "trainer.max_steps=4",
                   "module.max_steps=4", "data.batch_size=4", "data.samples_per_epoch=128",
                   "trainer.accumulate_grad_batches=2", "eval.enabled=false",
                   "callbacks.periodic_eval.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=4",
                   "callbacks.weights_snapshot.every_n_steps=2", f"paths.output_dir={out}")],
        cwd=REPO, env=clean_env(), timeout=400, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step0000002.ckpt", "step0000004.ckpt"]
    snap = torch.load(out / "snapshots" / "step0000004.ckpt", map_location="cpu", weights_only=False)
    ckpt = torch.load(out / "checkpoints" / "step0000004.ckpt", map_location="cpu", weights_only=False)
    assert snap["global_step"] == 4 and snap["blip2_stage"] == 1 and "optimizer_states" not in snap
    assert set(snap["state_dict"]) == set(ckpt["state_dict"])  # the trainable weights, nothing frozen
    for k, v in snap["state_dict"].items():
        assert v.dtype == torch.bfloat16, k
        torch.testing.assert_close(v, ckpt["state_dict"][k].to(torch.bfloat16), rtol=0, atol=0, msg=k)
    sizes = [(out / d / "step0000004.ckpt").stat().st_size for d in ("snapshots", "checkpoints")]
    assert sizes[0] < sizes[1] / 4, sizes  # 2 B per weight against 12 B (fp32 weight + AdamW's two moments)

    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", str(out / "snapshots" / "step0000004.ckpt"),
                        "--out", str(tmp_path / "export")], cwd=REPO, env=clean_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    hf = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path / "export"))
    torch.testing.assert_close(hf.query_tokens.detach().reshape(-1),
                               snap["state_dict"]["model.hf.query_tokens"].float().reshape(-1))


def test_snapshot_retention_keeps_what_this_run_wrote_after_a_resume(tmp_path):
    """keep_last counts the snapshots up to the step just written: a run killed at step 40 and resumed from its
    step-20 checkpoint does not delete its new step-20 snapshot because steps 30 and 40 (which it writes again)
    sort later. A dtype that is not a float type is a config error."""
    from blip2_train.lit.snapshot import WeightsSnapshot
    from blip2_train.utils.errors import ConfigError

    for step in (5, 10, 20, 30, 40):
        (tmp_path / f"step{step:07d}.ckpt").write_bytes(b"x")
    WeightsSnapshot(every_n_steps=5, dirpath=str(tmp_path), keep_last=2)._prune(20)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step0000010.ckpt", "step0000020.ckpt", "step0000030.ckpt", "step0000040.ckpt"]
    with pytest.raises(ConfigError, match="dtype"):
        WeightsSnapshot(every_n_steps=5, dtype="int8")
