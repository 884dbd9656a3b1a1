"""Everyday robustness: wrong config types, checkpoints of the other stage, missing LLM, NaN losses, and
checkpoints that survive a kill during saving. (Bad images, shards and annotations: test_data.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_cli, tiny_stage1
from test_ddp import REPO, clean_env


def cli(*args, tool="train", timeout=300):
    return subprocess.run([sys.executable, "-m", f"blip2_train.cli.{tool}", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line(r) -> str:
    """Exit status 2, no traceback, exactly one `error:` line (log lines may precede it)."""
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


@pytest.mark.parametrize("override,key", [("data.batch_size=abc", "data.batch_size"),
                                          ("module.lr=fast", "module.lr"),
                                          ("model.freeze_vision=maybe", "model.freeze_vision")])
def test_config_value_of_wrong_type_is_one_line(synth, tmp_path, capsys, override, key):
    from blip2_train.cli.train import main

    rc = main(["experiment=stage1_pretrain", *tiny_cli(synth, override, f"paths.output_dir={tmp_path / 'run'}")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and key in err[0] and "must be" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_nonexistent_llm_path_is_one_line(synth, tmp_path, stage1_export, capsys):
    from blip2_train.cli.train import main

    rc = main(["experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tmp_path / 'no_llm'}",
                                                       f"paths.stage1_checkpoint={stage1_export}",
                                                       f"paths.output_dir={tmp_path / 'run'}")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "no_llm" in err[0] and "not found" in err[0]


def test_checkpoint_of_the_other_stage_is_refused(synth, tiny_llms, stage1_export, tmp_path):
    from blip2_train.utils.checkpoints import load_lightning_checkpoint
    from blip2_train.utils.errors import CheckpointError
    from conftest import tiny_stage2

    s1 = tmp_path / "s1"
    r = cli("experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=2", "data.batch_size=4",
                                                    "data.samples_per_epoch=40", "eval.enabled=false",
                                                    f"paths.output_dir={s1}"))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = s1 / "checkpoints" / "last.ckpt"
    # resuming a stage-2 run from a stage-1 checkpoint
    line = one_line(cli("experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tiny_llms['opt']}",
                                                                "paths.stage1_checkpoint=null", f"ckpt_path={ckpt}",
                                                                f"paths.output_dir={tmp_path / 's2'}")))
    assert "stage-1" in line and "stage1_checkpoint" in line
    # loading it into a stage-2 model for evaluation or export
    with pytest.raises(CheckpointError, match="stage-1 checkpoint but the model configured here is stage 2"):
        load_lightning_checkpoint(tiny_stage2(tiny_llms["opt"]), ckpt)
    # a stage-1 Lightning checkpoint IS a valid start for stage 2 (its run config rebuilds the frozen ViT)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                  image_size=32, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   max_position_embeddings=64)
    m = tiny_stage2(tiny_llms["opt"], ckpt, vision=vision, qformer=qformer, num_query_tokens=8)
    from blip2_train.utils.checkpoints import run_config_of
    from hydra.utils import instantiate

    s1_model = instantiate(run_config_of(ckpt).model)
    load_lightning_checkpoint(s1_model, ckpt)
    torch.testing.assert_close(m.hf.query_tokens, s1_model.hf.query_tokens, rtol=0, atol=0)


def test_nonfinite_losses_are_skipped_counted_then_stop(synth, tokenizer):
    import lightning as L

    from blip2_train.lit.stage1 import NonFiniteLossError, Stage1Module
    from conftest import batch_of

    def batches(pattern):
        out = []
        for i, bad in enumerate(pattern):
            img, ids, mask = batch_of(tokenizer, ["a red circle", "a blue square", "two green triangles"], seed=i)
            if bad:
                img = torch.full_like(img, float("nan"))
            out.append({"image": img, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(3)})
        return out

    def fit(pattern, max_steps, limit):
        module = Stage1Module(tiny_stage1(synth["tokenizer"]), lr=1e-3, warmup_steps=0, max_steps=max_steps,
                              max_consecutive_nonfinite=limit)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(pattern), batch_size=None))
        return module, trainer

    module, trainer = fit([0, 1, 0, 1, 0, 0], max_steps=6, limit=3)
    # 6 steps, the 2 with a NaN counted and skipped: AdamW updated weights and moments 4 times only
    assert module.nonfinite_total == 2 and trainer.global_step == 6
    opt = trainer.optimizers[0]
    assert {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]} == {4}
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        fit([0, 1, 1, 1, 0], max_steps=5, limit=3)


def test_kill_during_checkpoint_save_leaves_the_previous_one_intact(synth, tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "slow_save_worker.py"), str(synth["tokenizer"]),
                             str(synth["train_shards"]), str(out)], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(out.glob(".step010.ckpt.tmp-*")) and not list(out.glob(".last.ckpt.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the slow save never started"
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the save: part of the file is written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in out.iterdir())
    assert "step005.ckpt" in names and "last.ckpt" in names and "step010.ckpt" not in names, names
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5 and "slow" not in last  # the previous checkpoint, whole
    from blip2_train.utils.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"x": 1}, out / "step010.ckpt")  # the next save cleans the debris
    assert not list(out.glob(".*.tmp-*"))


def test_coco_annotation_of_the_wrong_shape_names_the_file(tmp_path):
    from blip2_train.data.annotations import read_annotations
    from blip2_train.utils.errors import DataError

    bad = tmp_path / "nocaps.json"
    bad.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(DataError, match="nocaps.json.*COCO caption file"):
        read_annotations(bad, "coco")
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2}]}))
    with pytest.raises(DataError, match=r"annotations\[0\] refers to image_id 2"):
        read_annotations(bad, "coco")


def test_a_checkpoint_missing_a_trained_weight_is_refused_by_name(synth, tmp_path):
    """blip2-export of a Lightning checkpoint that lost a Q-Former weight: one error naming it, no export
    (it would otherwise keep that weight at its initial values)."""
    r = cli("experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=1", "data.batch_size=4",
                                                    "data.samples_per_epoch=40", "eval.enabled=false",
                                                    f"paths.output_dir={tmp_path / 'run'}"))
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    name = "model.hf.qformer.encoder.layer.0.attention.attention.query.weight"
    assert name in state["state_dict"]
    del state["state_dict"][name]
    torch.save(state, ckpt)
    import subprocess
    import sys

    from test_ddp import REPO, clean_env

    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", str(ckpt), "--out", str(tmp_path / "exp")],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "hf.qformer.encoder.layer.0.attention.attention.query.weight" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "exp").exists()
