"""LightningModule for stage 1: the training loop around `Blip2Stage1` (which knows nothing of Lightning)."""

from __future__ import annotations

from blip2_train.lit.base import Blip2LitModule, NonFiniteLossError  # noqa: F401  (re-exported)


class Stage1Module(Blip2LitModule):
    stage = 1

    def compute(self, batch: dict):
        out = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch.get("image_id"))
        return out.loss, {"loss_itc": out.loss_itc, "loss_itm": out.loss_itm, "loss_lm": out.loss_lm,
                          "temp": self.model.temp.detach().reshape(())}
