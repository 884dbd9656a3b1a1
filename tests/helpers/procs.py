"""Commands run the way a user runs them: as subprocesses with a clean environment, on 1 process or under
torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.tiny import REPO

PORTS = iter(range(29611, 29700))


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_",
                                                                   "BLIP2_", "PL_", "TORCHELASTIC"))}
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra})
    return env


def cli(*args, tool="train", timeout=300):
    return subprocess.run([sys.executable, "-m", f"blip2_train.cli.{tool}", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def one_line(r) -> str:
    """Exit status 2, no traceback, exactly one `error:` line (log lines may precede it)."""
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return errors[0]


def run(tool: str, args: list[str], nproc: int = 1, timeout: int = 300, script: str | None = None,
        **env) -> subprocess.CompletedProcess:
    """`blip2-<tool>` (as `python -m`) on one process, or under torchrun on `nproc` (gloo, CPU), or through a
    `run_scripts/` launcher with GPUS=nproc."""
    module = "blip2_train.cli." + {"eval": "evaluate"}.get(tool, tool)
    cmd = [sys.executable, "-m", module, *args]
    if script:
        cmd = ["bash", str(REPO / "run_scripts" / script), *args]
        env.update(GPUS=str(nproc), BIN=str(Path(sys.executable).parent), PYTHON=sys.executable)
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={next(PORTS)}", "-m", module, *args]
        if tool == "train":
            cmd += [f"trainer.devices={nproc}", "+strategy.process_group_backend=gloo"]
    r = subprocess.run(cmd, cwd=REPO, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd[3:])}\n{r.stderr[-4000:]}"
    return r


def summary_rows(stdout: str) -> dict[str, str]:
    """The `  key: value` rows of the summary a command prints last (run, metrics, checkpoint, next)."""
    rows = {}
    for line in stdout.strip().splitlines():
        key, sep, value = line.strip().partition(": ")
        if line.startswith("  ") and sep and key.isidentifier():
            rows[key] = value.strip()
    return rows
