"""strategy=fsdp (FSDP2, per-block `fully_shard`) as a user runs it: `blip2-train experiment=stage2_pretrain` under
torchrun on 2 CPU processes (gloo), with the frozen towers in bf16 beside the fp32 trainable weights: the mix that
FSDP1 (Lightning's FSDPStrategy) cannot flatten into one unit. Checked against DDP on the same data, resumed from
its sharded checkpoint, and exported to a transformers directory."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.tiny import tiny_cli
from helpers.procs import REPO, clean_env

def free_port() -> int:
    """A port no one holds now: another test session on this machine may run the same fixed ports."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(out: Path, synth, llm, strategy: str, *extra, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "blip2_train.cli.train", "experiment=stage2_pretrain",
           *tiny_cli(synth, f"paths.llm_dir={llm}", "paths.stage1_checkpoint=null", "arch.frozen_dtype=bfloat16",
                     f"strategy={strategy}", f"trainer.devices={nproc}", "data.batch_size=4", "data.samples_per_epoch=64",
                     "logger=csv", "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
                     "trainer.max_steps=4", "module.max_steps=4", "module.warmup_steps=1", "eval.enabled=false",
                     "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}", *extra)]
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def losses(run: Path) -> dict[int, float]:
    (f,) = run.glob("csv/**/metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f.open()) if r.get("train/loss")}


def assert_resume_repeats(out: Path, reference: dict[int, float], synth, llm, ckpt: Path, *extra, nproc: int = 2):
    """A requeued job resumed from `ckpt` (its step-2 shards; frozen weights come from the model config)
    repeats steps 2-3 of the uninterrupted run."""
    fit(out, synth, llm, "fsdp", "strategy.param_dtype=null", *extra, f"ckpt_path={ckpt}", nproc=nproc)
    resumed = losses(out)
    assert sorted(resumed) == [2, 3]
    for step, value in resumed.items():
        assert value == pytest.approx(reference[step], rel=1e-6), f"step {step}"


def assert_export_equals_ddp(ckpt: Path, export: Path, ddp_run: Path) -> dict:
    """blip2-export consolidates the shards into a directory plain transformers loads, with the trained weights
    (DDP's on the same data); -> DDP's last checkpoint."""
    from transformers import Blip2ForConditionalGeneration

    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", str(ckpt), "--out", str(export)], cwd=REPO,
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = Blip2ForConditionalGeneration.from_pretrained(str(export)).language_projection.weight
    ddp_state = torch.load(ddp_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # in the export's dtype (the frozen LLM's: bf16 here)
    torch.testing.assert_close(exported, ddp_state["state_dict"]["model.hf.language_projection.weight"].to(exported.dtype),
                               rtol=0, atol=1e-3 if exported.dtype == torch.bfloat16 else 1e-6)
    return ddp_state


@pytest.mark.timeout(900)
def test_fsdp2_trains_like_ddp_resumes_from_its_shards_and_exports(synth, tiny_llms, tmp_path):
    import torch.distributed.checkpoint as dcp

    llm = tiny_llms["opt"]
    # fp32 all-gathers on CPU (strategy.param_dtype=null) so that FSDP2 and DDP compute the same numbers
    r = fit(tmp_path / "fsdp", synth, llm, "fsdp", "strategy.param_dtype=null",
            "callbacks.weights_snapshot.every_n_steps=4")
    assert "FSDP2: 6 block units + the root, over 2 ranks" in r.stderr  # 2 ViT + 2 Q-Former + 2 OPT blocks
    fit(tmp_path / "ddp", synth, llm, "ddp", "+strategy.process_group_backend=gloo")
    sharded, ddp = losses(tmp_path / "fsdp"), losses(tmp_path / "ddp")
    assert sorted(sharded) == [0, 1, 2, 3]
    for step, value in ddp.items():
        assert sharded[step] == pytest.approx(value, rel=1e-5), f"step {step}"
    # the checkpoint is a torch.distributed.checkpoint directory holding the trainable weights only
    ckpt = tmp_path / "fsdp" / "checkpoints"
    # last.ckpt was saved over step after step: through a hidden directory renamed into place, none left behind
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "step0000002.ckpt", "step0000004.ckpt"]
    stored = list(dcp.FileSystemReader(str(ckpt / "step0000004.ckpt")).read_metadata().state_dict_metadata)
    assert "state_dict.model.hf.language_projection.weight" in stored and "optimizer_0.state" in str(stored)
    assert not [k for k in stored if "language_model" in k or "vision_model.encoder" in k]

    assert_resume_repeats(tmp_path / "resumed", sharded, synth, llm, ckpt / "step0000002.ckpt")
    ddp_state = assert_export_equals_ddp(ckpt / "last.ckpt", tmp_path / "export", tmp_path / "ddp")
    # the step-4 weights snapshot gathered the shards: whole tensors, bf16, the trainable ones only
    snap = torch.load(tmp_path / "fsdp" / "snapshots" / "step0000004.ckpt", weights_only=False)["state_dict"]
    proj = snap["model.hf.language_projection.weight"]
    assert proj.dtype == torch.bfloat16 and not any("language_model" in k for k in snap)
    torch.testing.assert_close(proj.float(), ddp_state["state_dict"]["model.hf.language_projection.weight"].float(),
                               rtol=0, atol=1e-2)


@pytest.mark.timeout(900)
def test_hsdp_two_replicas_of_two_shards_trains_like_ddp_resumes_and_exports(synth, tiny_llms, tmp_path):
    """HSDP (`strategy.replicate_degree=2`) on 4 processes: a 2 x 2 mesh, each replica sharded over 2 ranks,
    gradients reduce-scattered within a replica and all-reduced across the two. Same losses as DDP on 4
    processes; a resume from its step-2 shards on the same mesh repeats steps 2-3; blip2-export consolidates it."""
    llm = tiny_llms["opt"]
    r = fit(tmp_path / "hsdp", synth, llm, "fsdp", "strategy.param_dtype=null", "strategy.replicate_degree=2",
            nproc=4)
    assert "over 4 ranks (HSDP: 2 replicas x 2 shards)" in r.stderr, r.stderr[-2000:]
    fit(tmp_path / "ddp", synth, llm, "ddp", "+strategy.process_group_backend=gloo", nproc=4)
    hsdp, ddp = losses(tmp_path / "hsdp"), losses(tmp_path / "ddp")
    assert sorted(hsdp) == sorted(ddp) == [0, 1, 2, 3]
    for step, value in ddp.items():
        assert hsdp[step] == pytest.approx(value, rel=1e-5), f"step {step}"
    ckpt = tmp_path / "hsdp" / "checkpoints"
    assert_resume_repeats(tmp_path / "resumed", hsdp, synth, llm, ckpt / "step0000002.ckpt",
                          "strategy.replicate_degree=2", nproc=4)
    assert_export_equals_ddp(ckpt / "last.ckpt", tmp_path / "export", tmp_path / "ddp")


@pytest.mark.timeout(600)
def test_fsdp2_stage1_keeps_the_stored_temperature_clamped(synth, tmp_path):
    """Stage 1 under FSDP2: the forward clamps the temperature it sees, an all-gathered copy; the stored
    (sharded) parameter is clamped after each update, so the checkpoint holds a temperature within bounds."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from blip2_train.models.stage1 import TEMP_MAX

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
           *tiny_cli(synth, "strategy=fsdp", "strategy.param_dtype=null", "trainer.devices=2", "data.batch_size=4",
                     "data.samples_per_epoch=64", "trainer.max_steps=2", "module.max_steps=2", "model.temp=0.9",
                     "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}")]
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "FSDP2:" in r.stderr
    dcp_to_torch_save(out / "checkpoints" / "last.ckpt", tmp_path / "full.pt")
    temp = torch.load(tmp_path / "full.pt", weights_only=False)["state_dict"]["model.temp"]
    assert float(temp.max()) <= TEMP_MAX + 1e-7, temp


def test_fsdp2_full_state_file_checkpoints_are_refused_in_one_line(synth, tmp_path):
    """save_distributed_checkpoint=false would write a file without the frozen weights that the strict load
    then refuses at resume: refused before training, naming the setting."""
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
                        *tiny_cli(synth, "strategy=fsdp", "strategy.save_distributed_checkpoint=false",
                                  "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0",
                                  f"paths.output_dir={tmp_path / 'run'}")],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "save_distributed_checkpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
