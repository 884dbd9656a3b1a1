"""A callback that acts every N optimizer steps (periodic evaluation, weights snapshots)."""

from __future__ import annotations

import lightning as L


class EveryNSteps(L.Callback):
    """Calls `at_step(trainer, pl_module, step)` once at every multiple of `every_n_steps` (0 = never).
    `on_train_batch_end` runs once per micro-batch: under gradient accumulation it sees each step several times,
    so a step is acted on only the first time."""

    def __init__(self, every_n_steps: int):
        self.every_n_steps = int(every_n_steps)
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or step == self._last_step:
            return
        if trainer.should_stop:  # a signal stops the run at this step (lit/signal_stop.py): no minutes-long extra
            return
        self._last_step = step
        self.at_step(trainer, pl_module, step)

    def at_step(self, trainer, pl_module, step: int) -> None:
        raise NotImplementedError
