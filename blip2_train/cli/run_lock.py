"""One run per output directory.

Two runs writing into one directory interleave metrics.csv and leave one run's last.ckpt beside the other's
config.yaml. Rank 0 takes `<run_dir>/.run.lock` (host, pid, start time) before writing anything; the other
ranks of the same run never take it (they are not rank 0), so they are not refused by their own rank 0."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from blip2_train.config.run_dir import launcher_run_id, pid_start

log = logging.getLogger("blip2_train")

LOCK_NAME = ".run.lock"
_held: list[Path] = []


def _holder_alive(holder: dict) -> bool:
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    start = pid_start(pid)
    return not (holder.get("pid_start") and start and start != holder["pid_start"])  # else: pid reused


def _read_lock(path: Path) -> dict | None:
    for _ in range(20):  # the holder may be between creating the file and writing it
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def acquire_run_lock(run_dir: Path) -> None:
    """Take `run_dir`'s lock or raise ConfigError naming its holder. A lock left by a dead process on this host
    (a killed run) is taken over; a lock held by this process is re-entered."""
    from blip2_train.utils.errors import ConfigError

    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    job = launcher_run_id(across_nodes=False)  # who holds the lock: a per-node id is enough
    me = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": job,
          "pid_start": pid_start(os.getpid())}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is not None and holder.get("host") == host and holder["pid"] == os.getpid():
                return
            # a job requeued onto another node (same SLURM job id) succeeds itself; on this host the pid tells
            requeued = holder is not None and holder.get("host") != host and job is not None and holder.get("job") == job
            if holder is not None and not requeued and (holder.get("host") != host or _holder_alive(holder)):
                raise ConfigError(
                    f"{run_dir} is in use by another run (pid {holder['pid']} on {holder.get('host')}, started "
                    f"{holder.get('started')}): wait for it to end, or choose another paths.output_dir (if that run "
                    f"is gone, delete {path})")
            log.warning("taking over the stale lock %s (%s)", path,
                        "unreadable" if holder is None else f"an earlier attempt of job {job}" if requeued
                        else f"pid {holder['pid']} on this host is gone")
            if _read_lock(path) != holder:
                continue  # someone else took it over meanwhile
            try:  # a rename is atomic: of two processes taking over the same stale lock, one wins
                os.replace(path, path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.append(path)
        return
    raise ConfigError(f"could not take the lock {path}: other runs keep taking it")


def holds_lock(run_dir: Path) -> bool:
    """Whether this process holds `run_dir`'s lock."""
    return (Path(run_dir) / LOCK_NAME).resolve() in {p.resolve() for p in _held}


def release_run_locks() -> None:
    while _held:
        path = _held.pop()
        holder = _read_lock(path) if path.exists() else None
        if holder is not None and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


atexit.register(release_run_locks)

