"""LightningModule for stage 2 and caption fine-tuning: the LLM's generative loss through the visual prompt."""

from __future__ import annotations

from blip2_train.lit.base import Blip2LitModule


class Stage2Module(Blip2LitModule):
    stage = 2

    def compute(self, batch: dict):
        out = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch.get("decoder_attention_mask"))
        n_tokens = (batch["labels"] != -100).sum()
        return out.loss, {"label_tokens": n_tokens.float()}
