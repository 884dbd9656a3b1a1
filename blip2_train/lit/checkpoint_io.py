"""The Lightning plugin that writes every checkpoint atomically (`utils.checkpoints.save_atomic`)."""

from __future__ import annotations

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from blip2_train.utils.checkpoints import save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_atomic(checkpoint, path)
