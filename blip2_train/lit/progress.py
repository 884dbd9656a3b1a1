"""What a person watches during training: a progress bar in optimizer steps, and one table of the model's parts.

Training streams data with `max_epochs=-1` and stops at `max_steps`: Lightning's bar reads "Epoch 0/-2" and counts
batches of an epoch, and its model summary prints "Total FLOPs: 0" (nothing runs to count them) and every module
in train mode (the frozen towers are put back in eval mode after it). Here the bar counts steps of max_steps with
the learning rate in scientific notation (1e-4 printed with three decimals reads 0.000), and the summary gives each
part's trainable and frozen parameters and dtype.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

log = logging.getLogger("blip2_train.train")


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        return f"step ({self.trainer.max_steps} in all)" if self.trainer.max_steps > 0 else f"epoch {current_epoch}"

    @property
    def total_train_batches(self):
        return self.trainer.max_steps if self.trainer.max_steps > 0 else super().total_train_batches

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps > 0 and self.progress is not None and self.train_progress_bar_id is not None:
            # one bar over the whole run, continued across the data's epochs (and from a resumed step)
            self.progress.reset(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step,
                                description=self._get_train_description(trainer.current_epoch), visible=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps <= 0:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        return {k: (f"{v:.2e}" if k.endswith("lr") and isinstance(v, float) else v) for k, v in items.items()}


class PartsSummary(Callback):
    """One table at the start of training: each part of the model, its trainable and frozen parameters."""

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        model = getattr(pl_module.model, "hf", pl_module.model)
        rows = []
        for name, part in model.named_children():
            rows.append(self._row(name, list(part.parameters())))
        loose = [p for _, p in model.named_parameters(recurse=False)]  # e.g. query_tokens
        if loose:
            rows.append(self._row("(own parameters)", loose))
        rows.append(self._row("total", list(model.parameters())))
        widths = [max(len(r[i]) for r in rows + [self.HEAD]) for i in range(len(self.HEAD))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [self.HEAD, *rows]]
        log.info("model parts:\n%s", "\n".join(lines))

    HEAD = ("part", "trainable", "frozen", "dtype")

    @staticmethod
    def _row(name: str, params: list[torch.nn.Parameter]) -> tuple[str, ...]:
        trained = sum(p.numel() for p in params if p.requires_grad)
        frozen = sum(p.numel() for p in params if not p.requires_grad)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params})
        return name, _count(trained), _count(frozen), "/".join(dtypes)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)
