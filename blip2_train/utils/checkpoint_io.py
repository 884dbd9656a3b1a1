"""Checkpoint files written atomically: a temporary file in the SAME directory, fsync, then os.replace.

Lightning's default writes through an fsspec transaction whose temporary file lives in the system temp
directory; when that is another filesystem the final move is a copy, and a job killed during it (preemption,
OOM killer, time limit) leaves a truncated `last.ckpt`. A rename within one directory is atomic: a killed
save leaves the previous checkpoint intact, plus a `.NAME.tmp-PID` file that the next save removes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed save
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself reaches the disk
            finally:
                os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)


def checkpoint_problem(path) -> str | None:
    """None when `path` looks like a whole checkpoint, else why not, without reading the tensors.

    torch.save writes a zip archive whose directory sits at the END of the file: a truncated copy (a crash
    mid-copy, a full disk) has no directory, or members that reach past the end of the file. DeepSpeed
    checkpoints are directories: DeepSpeed writes its `latest` tag file, torch.distributed.checkpoint (FSDP) its
    `.metadata`, after the shards; a directory without it is a save that was cut short.
    """
    import zipfile

    path = Path(path)
    if path.is_dir():
        if not any(path.iterdir()):
            return "empty checkpoint directory"
        if (path / "latest").exists() or (path / ".metadata").exists():
            return None
        return "incomplete sharded checkpoint (no DeepSpeed `latest` tag or distributed-checkpoint `.metadata`)"
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"truncated (member {info.filename} runs past the end of the file)"
    except zipfile.BadZipFile:
        return "truncated or not a torch checkpoint (no zip directory at its end)"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


def remove_save_debris(directory) -> list[Path]:
    """Delete the `.NAME.tmp-PID` files that killed saves left in `directory`; only call this while no other
    process can be saving there (the run lock is held)."""
    removed = []
    import shutil

    for tmp in Path(directory).glob(".*.tmp-*"):  # files (torch.save) and directories (sharded saves)
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
