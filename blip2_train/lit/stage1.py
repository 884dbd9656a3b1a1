"""LightningModule for stage 1: the training loop around `Blip2Stage1` (which knows nothing of Lightning)."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from blip2_train.lit.optim import build_adamw, build_scheduler
from blip2_train.models.stage1 import Blip2Stage1
from blip2_train.utils.errors import Blip2TrainError

log = logging.getLogger(__name__)


class NonFiniteLossError(Blip2TrainError):
    pass


class Stage1Module(L.LightningModule):
    def __init__(
        self,
        model: Blip2Stage1,
        lr: float = 1e-4,
        min_lr: float = 1e-5,
        warmup_steps: int = 5000,
        warmup_start_lr: float = 1e-6,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        no_decay_names: tuple[str, ...] = ("temp", "query_tokens"),
        max_steps: int | None = None,
        max_consecutive_nonfinite: int = 5,
        save_frozen_weights: bool = False,
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self._nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._t_last = None

    # Modes are set here because Lightning calls .train() on the whole module at fit start: the frozen
    # ViT must go back to eval mode (no dropout), every time.
    def on_train_start(self) -> None:
        self.model.set_train_modes(True)

    def on_train_epoch_start(self) -> None:
        self.model.set_train_modes(True)

    def on_validation_model_train(self) -> None:
        self.model.set_train_modes(True)

    def training_step(self, batch: dict, batch_idx: int):
        out = self.model(batch["image"], batch["input_ids"], batch["attention_mask"], batch.get("image_id"))
        bs = batch["image"].shape[0]
        if not torch.isfinite(out.loss):
            self._nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=bs)
            log.warning("non-finite loss at step %d (%d in a row): step skipped", self.global_step,
                        self._nonfinite_in_a_row)
            if self._nonfinite_in_a_row >= self.hparams.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self._nonfinite_in_a_row} non-finite losses in a row at step "
                                         f"{self.global_step}: stopping (max_consecutive_nonfinite)")
            return None  # Lightning skips backward and the optimizer step
        self._nonfinite_in_a_row = 0
        now = time.perf_counter()
        log_kw = dict(batch_size=bs, sync_dist=False)
        self.log("train/loss", out.loss.detach(), prog_bar=True, **log_kw)
        self.log("train/loss_itc", out.loss_itc, **log_kw)
        self.log("train/loss_itm", out.loss_itm, **log_kw)
        self.log("train/loss_lm", out.loss_lm, **log_kw)
        self.log("train/temp", self.model.temp.detach(), **log_kw)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, **log_kw)
        if "data_skipped" in batch:
            self.log("data/skipped", float(batch["data_skipped"]), reduce_fx="sum", **log_kw)
        if self._t_last is not None:
            self.log("train/samples_per_s", bs * self.trainer.world_size / (now - self._t_last), prog_bar=True,
                     **log_kw)
        self._t_last = now
        return out.loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = build_adamw(self.model, hp.lr, hp.weight_decay, hp.betas, no_decay_names=hp.no_decay_names)
        max_steps = hp.max_steps or self.trainer.estimated_stepping_batches
        if not max_steps or math.isinf(max_steps):
            raise Blip2TrainError("set trainer.max_steps (or max_epochs with a sized data stream)")
        sched = build_scheduler(opt, int(max_steps), hp.lr, hp.min_lr, hp.warmup_steps, hp.warmup_start_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Checkpoints hold the trainable weights only (plus optimizer state): a frozen ViT-g is ~2 GB
    # that never changes. `save_frozen_weights=True` keeps everything.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.save_frozen_weights:
            return
        keep = {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in keep}
        checkpoint["frozen_weights_omitted"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("frozen_weights_omitted"):
            full = self.state_dict()
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full
