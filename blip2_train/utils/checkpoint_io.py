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
