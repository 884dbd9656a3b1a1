"""Faults injected into real runs through the shipped configs (`+callbacks.<name>._target_=helpers.fault_injection.X`,
with tests/ on PYTHONPATH). They break the inputs, never the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch


class NaNLossAt(L.Callback):
    """At optimizer step `step`, fill the batch's images with NaN on `rank` (an int, or "all"): the forward pass
    then yields a NaN loss, as a corrupt batch or an overflow would. At the end, each rank reports what it saw
    to `<report>.<rank>`."""

    def __init__(self, step: int, rank, report: str):
        self.step, self.rank, self.report = int(step), rank, Path(report)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and (self.rank == "all" or int(self.rank) == trainer.global_rank):
            batch["image"].fill_(float("nan"))

    def on_train_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        steps = {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"] if p in opt.state}
        report = {"global_step": trainer.global_step, "nonfinite_total": pl_module.nonfinite_total,
                  "adamw_steps": steps.pop() if len(steps) == 1 else sorted(steps),
                  "finite": all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())}
        path = self.report.parent / f"{self.report.name}.{trainer.global_rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))
