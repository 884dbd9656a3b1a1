"""LightningModule for stage 1: the training loop around `Blip2Stage1` (which knows nothing of Lightning)."""

from __future__ import annotations

import torch

from blip2_train.lit.base import Blip2LitModule, NonFiniteLossError  # noqa: F401  (re-exported)
from blip2_train.models.stage1 import TEMP_MAX, TEMP_MIN


class Stage1Module(Blip2LitModule):
    stage = 1

    def compute(self, batch: dict):
        out = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch.get("image_id"))
        return out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
                          "temp": out.temp}

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # The forward's in-place clamp acts on the parameter that forward sees; under FSDP2 that is an
        # all-gathered copy, freed after use. Clamp the stored (sharded) parameter after each update too.
        with torch.no_grad():
            self.model.temp.clamp_(TEMP_MIN, TEMP_MAX)
