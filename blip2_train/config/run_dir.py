"""The run directory, as Hydra's hydra.run.dir: one stamp per launch that every rank (and every job of a sweep)
agrees on, and the directory it names."""

from __future__ import annotations

import os
import time
from pathlib import Path

RUN_DIR_ENV = "BLIP2_RUN_DIR"
STAMP_ENV = "BLIP2_STAMP"
_stamp: list[str] = []


def reset_stamp() -> None:
    """Forget this process's stamp: the next CLI call in the same process (tests, sweeps) picks its own."""
    _stamp.clear()


def pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process (Linux /proc), or None."""
    ticks = pid_start(pid)
    try:
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
        return boot + int(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None
    except (OSError, StopIteration, ValueError):
        return None


def launcher_run_id(across_nodes: bool = True) -> str | None:
    """The id every process of one launch shares, also after a requeue: SLURM's job id (with the step id, so
    two `srun` steps of one allocation are two runs), torchrun's rendezvous id. torchrun without `--rdzv-id` (and
    without --standalone) says "none": then the start time of the torchrun agent that forked this node's ranks,
    which the nodes of a multi-node launch do not share (refused unless `across_nodes` is False)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID", "")
        return f"{job}.{step}" if step.isdigit() else job
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return rdzv
    if rdzv == "none":
        nodes_differ = os.environ.get("WORLD_SIZE", "1") != os.environ.get("LOCAL_WORLD_SIZE", "1")
        if nodes_differ and across_nodes:  # each node's agent started at its own time: the nodes would name different directories
            from blip2_train.utils.errors import ConfigError

            raise ConfigError(
                f"torchrun spans several nodes (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, LOCAL_WORLD_SIZE="
                f"{os.environ.get('LOCAL_WORLD_SIZE')}) without --rdzv-id, so the nodes cannot agree on a run "
                "directory: pass --rdzv-id=<id shared by the nodes, e.g. $SLURM_JOB_ID> or paths.output_dir=<dir>")
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))
    return None


def run_stamp() -> str:
    """The run's name under <log_dir>/<task_name>/: the stamp a launching blip2 process exported (a sweep's jobs,
    wherever submitit runs them, and Lightning's rank processes share it), else the launcher's run id (every rank
    computes the same directory), else the start time; fixed for the process until the next CLI call."""
    if not _stamp:
        _stamp.append(os.environ.get(STAMP_ENV) or launcher_run_id() or time.strftime("%Y-%m-%d_%H-%M-%S"))
    return _stamp[0]


def default_run_dir(output_dir, log_dir, task_name) -> str:
    """paths.output_dir when set; else the directory this run's rank 0 chose ($BLIP2_RUN_DIR, inherited by the
    processes Lightning launches); else <log_dir>/<task_name>/<stamp>."""
    if output_dir:
        return str(output_dir)
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    return str(Path(str(log_dir)) / str(task_name) / run_stamp())

