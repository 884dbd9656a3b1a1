"""Kill-and-resume: a run killed mid-way and resumed from its last checkpoint repeats the uninterrupted run's
loss sequence (data position, schedule, optimizer and per-step randomness all restored)."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.tiny import tiny_cli
from helpers.procs import REPO, clean_env

STEPS = 60


def cli(out: Path, synth, llm, *extra) -> list[str]:
    return [sys.executable, "-m", "blip2_train.cli.train", "experiment=stage2_pretrain",
            *tiny_cli(synth, f"paths.llm_dir={llm}", "paths.stage1_checkpoint=null",
                      "arch.vision.hidden_size=32", "arch.qformer.hidden_size=32", "arch.num_query_tokens=4",
                      "data.batch_size=8", "data.num_workers=2", "data.samples_per_epoch=240", "logger=csv",
                      "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=5",
                      f"trainer.max_steps={STEPS}", f"module.max_steps={STEPS}", "module.warmup_steps=10",
                      "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}",
                      *extra)]


def run_killed_after(cmd: list[str], run: Path, checkpoint: str = "step0000010.ckpt") -> None:
    """Start `cmd` and SIGKILL it as soon as `checkpoint` exists: mid-run, as a preemption would."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / checkpoint).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "metrics.json").exists()  # it really was interrupted


def losses(run: Path) -> dict[int, float]:
    (f,) = run.glob("csv/**/metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f.open()) if r.get("train/loss")}


@pytest.mark.timeout(600)
def test_killed_run_resumes_with_the_same_loss_sequence(synth, tiny_llms, tmp_path):
    """30 batches per epoch, the run's length given in epochs (trainer.max_steps=-1, as caption_coco_ft), killed
    mid-way through epoch 1: the resumed epoch skips its consumed batches instead of starting over (without
    reading them: the shards have manifests), and every later loss equals the uninterrupted run's."""
    kill_at = 45
    extra = ["trainer.max_steps=-1", f"trainer.max_epochs={STEPS // 30}"]
    full = tmp_path / "full"
    r = subprocess.run(cli(full, synth, tiny_llms["opt"], *extra), cwd=REPO, env=clean_env(), capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = losses(full)
    assert len(reference) == STEPS

    killed = tmp_path / "killed"
    run_killed_after(cli(killed, synth, tiny_llms["opt"], *extra), killed, f"step{kill_at:07d}.ckpt")

    resumed = tmp_path / "resumed"
    r = subprocess.run(cli(resumed, synth, tiny_llms["opt"], *extra,
                           f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"),
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    # the shards have manifests: the consumed batches were replayed over sample positions, not read
    assert "without reading them" in r.stderr, r.stderr[-3000:]
    after = losses(resumed)
    first = min(after)
    assert kill_at - 5 <= first <= kill_at + 5 and max(after) == STEPS - 1  # last.ckpt: kill_at or the one before
    for step, value in after.items():
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-5), f"step {step}"


def test_same_seed_same_numbers(synth):
    """Two runs with the same seed end with identical weights (data order, augmentation, hard negatives,
    dropout: all seeded)."""
    import lightning as L
    import torch

    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.lit.stage1 import Stage1Module
    from helpers.tiny import tiny_stage1

    def run():
        L.seed_everything(7)
        dm = Blip2DataModule(str(synth["tokenizer"]), [{"name": "s", "urls": str(synth["train_shards"])}],
                             batch_size=8, num_workers=0, image_size=32, samples_per_epoch=64, seed=7)
        module = Stage1Module(tiny_stage1(synth["tokenizer"], seed=7), lr=1e-3, warmup_steps=0, max_steps=4, seed=7)
        L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0).fit(module, datamodule=dm)
        return {k: v.clone() for k, v in module.model.state_dict().items()}

    a, b = run(), run()
    moved = 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = tiny_stage1(synth["tokenizer"], seed=7).state_dict()
    moved = sum(not torch.equal(a[k], fresh[k]) for k in a)
    assert moved > 10  # it did train


def test_micro_batches_of_one_accumulation_window_draw_different_randomness(synth):
    """With trainer.accumulate_grad_batches=2 both micro-batches of a step run under the same global_step: each
    must still get its own random stream (dropout masks, hard negatives), not a repeat of the first's."""
    import lightning as L
    import torch

    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.lit.stage1 import Stage1Module
    from helpers.tiny import tiny_stage1

    dm = Blip2DataModule(str(synth["tokenizer"]), [{"name": "s", "urls": str(synth["train_shards"])}],
                         batch_size=8, num_workers=0, image_size=32, samples_per_epoch=64, seed=7)
    module = Stage1Module(tiny_stage1(synth["tokenizer"], seed=7), lr=1e-3, warmup_steps=0, max_steps=3, seed=7)
    states = []  # the generator state each forward starts from (read only: draws nothing)
    module.model.register_forward_pre_hook(lambda m, a: states.append(torch.get_rng_state()))
    L.Trainer(max_steps=3, accumulate_grad_batches=2, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              limit_val_batches=0).fit(module, datamodule=dm)
    assert len(states) == 6
    assert len({bytes(s.numpy()) for s in states}) == 6  # 3 steps x 2 micro-batches, all distinct


@pytest.mark.timeout(600)
def test_killed_stage1_run_with_gradient_accumulation_resumes_with_the_same_losses(synth, tmp_path):
    """Stage 1 (random hard negatives), two micro-batches per step, killed and resumed through the CLI."""
    steps = 20

    def cmd(out, *extra):
        return [sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
                *tiny_cli(synth, "trainer.accumulate_grad_batches=2", "data.batch_size=8", "data.num_workers=1",
                          "data.samples_per_epoch=160", "logger=csv", "trainer.log_every_n_steps=1",
                          "callbacks.model_checkpoint.every_n_train_steps=5", f"trainer.max_steps={steps}",
                          f"module.max_steps={steps}", "module.warmup_steps=5", "eval.enabled=false",
                          "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}", *extra)]

    full = tmp_path / "full"
    r = subprocess.run(cmd(full), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    reference = losses(full)
    assert len(reference) == steps

    killed = tmp_path / "killed"
    run_killed_after(cmd(killed), killed)

    resumed = tmp_path / "resumed"
    r = subprocess.run(cmd(resumed, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"), cwd=REPO, env=clean_env(),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    after = losses(resumed)
    assert 5 <= min(after) < steps - 5 and max(after) == steps - 1  # last.ckpt: step 5 or 10
    for step, value in after.items():
        assert value == pytest.approx(reference[step], rel=1e-4, abs=1e-5), f"step {step}"
