"""LightningModule for instruction tuning and VQA fine-tuning: the LLM's loss on the answer, the instruction given
to the Q-Former and to the LLM."""

from __future__ import annotations

import logging

from blip2_train.lit.base import Blip2LitModule

log = logging.getLogger(__name__)


class InstructModule(Blip2LitModule):
    stage = 3
    _told_truncation = False

    def compute(self, batch: dict):
        out = self.model(batch["image"], batch["qformer_input_ids"], batch["qformer_attention_mask"],
                         batch["input_ids"], batch["attention_mask"], batch["labels"],
                         batch.get("decoder_attention_mask"))
        n_tokens = (batch["labels"] != -100).sum()
        cut = int(batch["instructions_truncated"])  # a Python int from the collator
        if cut and not self._told_truncation and self.global_rank == 0:
            self._told_truncation = True
            log.warning("instructions longer than data.max_txt_len tokens are cut from the left, as the reference "
                        "cuts them (%d in this batch); train/instructions_truncated counts them per step", cut)
        return out.loss, {"label_tokens": n_tokens.float(), "instructions_truncated": float(cut)}
