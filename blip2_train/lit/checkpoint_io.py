"""Checkpoints as Lightning writes them: every file atomically (`utils.checkpoints.save_atomic`), and a line in the
log for each one the run saves."""

from __future__ import annotations

import logging

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from blip2_train.utils.checkpoints import save_atomic

log = logging.getLogger("blip2_train.train")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_atomic(checkpoint, path)


class LoggedModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saying each save in the run's log (its `verbose` goes through Lightning's
    rank-zero logger, which the CLI keeps quiet for the rest of its chatter)."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            log.info("checkpoint saved: %s (step %d)", filepath, trainer.global_step)
