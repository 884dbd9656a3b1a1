"""Signals sent to a real `blip2-train` process, as schedulers send them: SIGTERM (scancel, preemption,
Kubernetes, torchrun's agent) and SIGINT (Ctrl-C) stop every rank after the same step with a checkpoint of that
step, one line naming the step, the checkpoint and `ckpt_path=auto`, and a non-zero exit status; SLURM's SIGUSR1
(hpc_ckpt_N.ckpt) resumes with every logged step under its own number."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.procs import PORTS, REPO, clean_env
from helpers.tiny import tiny_cli

LIMIT = 120  # seconds for each run


def train_args(synth, out: Path, *extra) -> list[str]:
    return ["experiment=stage1_pretrain",
            *tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=40", "eval.enabled=false",
                      "callbacks.periodic_eval.every_n_steps=0", "logger=csv", "trainer.log_every_n_steps=1",
                      "callbacks.model_checkpoint.every_n_train_steps=1000", f"paths.output_dir={out}", *extra)]


def start(synth, out: Path, *extra, nproc: int = 1, env: dict | None = None, session: bool = False) -> subprocess.Popen:
    args = train_args(synth, out, *extra)
    cmd = [sys.executable, "-m", "blip2_train.cli.train", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={next(PORTS)}", "-m", "blip2_train.cli.train", *args, f"trainer.devices={nproc}",
               "+strategy.process_group_backend=gloo"]
    return subprocess.Popen(cmd, cwd=REPO, env=clean_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)


def rows(run: Path) -> list[tuple[int, float]]:
    """(step label, train/loss) of every logged row, in the order written."""
    try:
        with open(run / "csv" / "metrics.csv") as f:
            return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]
    except (OSError, KeyError, ValueError):  # not written yet, or a row being written
        return []


def wait_for_step(proc: subprocess.Popen, run: Path, step: int) -> None:
    deadline = time.time() + LIMIT
    while not any(s >= step for s, _ in rows(run)):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the run ended or stalled before step {step}: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> str:
    try:
        _, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run did not stop: {proc.communicate()[1][-3000:]}") from None
    return err


def stop_line(err: str, sig: str, launcher_traceback: bool = False) -> tuple[int, Path]:
    """The one stop line, parsed. No traceback of ours; torchrun's agent prints its own SignalException's
    (`launcher_traceback`), which names no frame of this package."""
    lines = [line for line in err.splitlines() if line.startswith(f"stopped by {sig}")]
    assert len(lines) == 1, err[-3000:]
    m = re.fullmatch(rf"stopped by {sig} after step (\d+): checkpoint (\S+); resume with the same command plus "
                     r"ckpt_path=auto", lines[0])
    assert m, lines[0]
    if launcher_traceback:
        assert "blip2_train" not in "".join(line for line in err.splitlines() if line.startswith("  File ")), err
    else:
        assert "Traceback" not in err, err[-3000:]
    return int(m.group(1)), Path(m.group(2))


def resume(synth, out: Path, max_steps: int, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = start(synth, out, f"trainer.max_steps={max_steps}", "ckpt_path=auto", nproc=nproc)
    err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_step_exits_non_zero_and_resumes(synth, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(synth, out, "trainer.max_steps=1000")
    wait_for_step(proc, out, 3)
    proc.send_signal(sig)
    err = finish(proc)
    assert proc.returncode == code, err[-3000:]
    step, ckpt = stop_line(err, sig.name)
    assert step >= 4 and ckpt == out / "checkpoints" / f"step{step:07d}.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == step
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == step  # last.ckpt names that step too
    assert not (out / "metrics.json").exists()  # not a finished run
    assert not (out / ".run.lock").exists()
    resume(synth, out, step + 3)
    # each step logged once, under its own number: the stop saved the step it logged last, and the resume
    # continues after it
    assert [s for s, _ in rows(out)] == list(range(step + 3))


def test_ctrl_c_to_every_process_of_the_group_loader_workers_included(synth, tmp_path):
    """A terminal's Ctrl-C reaches every process of the foreground group: the loader workers leave it to the
    training process, which still stops after a step with its checkpoint."""
    out = tmp_path / "run"
    proc = start(synth, out, "trainer.max_steps=1000", "data.num_workers=2", session=True)
    wait_for_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    step, ckpt = stop_line(err, "SIGINT")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == step


def test_sigterm_to_torchrun_stops_both_ranks_after_one_step(synth, tmp_path):
    out = tmp_path / "run"
    proc = start(synth, out, "trainer.max_steps=1000", nproc=2)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which forwards it to both ranks
    err = finish(proc)
    assert proc.returncode != 0
    step, ckpt = stop_line(err, "SIGTERM", launcher_traceback=True)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == step
    resume(synth, out, step + 2, nproc=2)
    assert sorted({s for s, _ in rows(out)}) == list(range(step + 2))


def test_slurm_preemption_checkpoint_resumes_with_every_step_under_its_own_number(synth, tmp_path):
    """SLURM's SIGUSR1 (`--signal=USR1@90`): Lightning writes hpc_ckpt_1.ckpt and asks for a requeue; the job is
    then killed. `ckpt_path=auto` resumes from the hpc checkpoint, and each step the resumed run logs again carries
    the loss the killed run logged under that number (the resume is exact), up to the last step."""
    out = tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "blip2", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    proc = start(synth, out, "trainer.max_steps=1000", env=slurm)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + LIMIT
    while not (out / "hpc_ckpt_1.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    saved = torch.load(out / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"]
    wait_for_step(proc, out, saved + 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = dict(rows(out))
    last = saved + 4
    r = start(synth, out, f"trainer.max_steps={last}", "ckpt_path=auto", env=slurm)
    err = finish(r)
    assert r.returncode == 0, err[-3000:]
    assert "hpc_ckpt_1.ckpt" in err
    logged = rows(out)
    again = logged[len(before) if len(logged) > len(before) else 0:]
    assert [s for s, _ in again] == list(range(saved, last))  # each step once, the last one included
    for s, loss in again:
        if s in before:
            assert loss == pytest.approx(before[s], rel=1e-4), (s, loss, before[s])
