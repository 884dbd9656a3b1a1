"""What every blip2-train LightningModule shares: train/eval modes of frozen parts, non-finite-loss skipping,
AdamW + warmup/cosine by step, trainable-only checkpoints, throughput logging. Subclasses supply `compute`."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from blip2_train.lit.optim import build_adamw, build_scheduler, layer_decay_scales
from blip2_train.utils.errors import Blip2TrainError

log = logging.getLogger(__name__)


class NonFiniteLossError(Blip2TrainError):
    pass


class Blip2LitModule(L.LightningModule):
    def __init__(
        self,
        model,
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
        vision_layer_decay: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        # plain Python types in the checkpoint (Hydra hands over ListConfig), so torch.load(weights_only) reads it
        betas = tuple(float(b) for b in betas)
        no_decay_names = tuple(str(n) for n in no_decay_names)
        self.save_hyperparameters(ignore=["model"])
        self._nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._skip_optimizer_step = False
        self._t_last = None

    def compute(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> (loss to backpropagate, extra scalars to log under train/)."""
        raise NotImplementedError

    # Modes are set here because Lightning calls .train() on the whole module at fit start: frozen parts
    # (ViT, LLM) must go back to eval mode (no dropout), every time.
    def on_train_start(self) -> None:
        self.model.set_train_modes(True)
        self._relabel_steps = True

    def _label_steps_by_optimizer_steps(self) -> None:
        """Loggers label a step with the loop's count of optimizer steps, which Lightning restores + 1 at the
        first batch of a resumed run, to make up for checkpoints saved inside on_train_batch_end (before the loop
        counts the step). A SLURM preemption checkpoint (hpc_ckpt_N.ckpt) is saved from a signal handler after
        the count, so every later row came one step ahead. The count is the optimizer steps taken, whichever save
        the run resumed from: set once, at the first batch, after Lightning's adjustment."""
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step
        self._relabel_steps = False

    def on_train_epoch_start(self) -> None:
        self.model.set_train_modes(True)

    def on_validation_model_train(self) -> None:
        self.model.set_train_modes(True)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Every micro-batch draws its randomness (dropout, hard negatives) from a seed of (seed, step, rank,
        # batch index), so a resumed run repeats the uninterrupted one exactly without saving RNG states. The
        # batch index keeps the micro-batches of one gradient-accumulation window (same step) apart.
        from blip2_train.utils.hashing import stable_hash

        if getattr(self, "_relabel_steps", False):
            self._label_steps_by_optimizer_steps()
        torch.manual_seed(stable_hash("step", self.hparams.seed, self.global_step, self.global_rank, batch_idx))

    def training_step(self, batch: dict, batch_idx: int):
        loss, extras = self.compute(batch)
        bs = batch["image"].shape[0]
        if self.nonfinite_on_any_rank(loss):
            # Every rank still runs backward (DDP's and ZeRO's gradient collectives must match across ranks);
            # the optimizer step is then skipped on all ranks at once (optimizer_step), the GradScaler pattern.
            self._skip_optimizer_step = True
            self._nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_total), batch_size=bs)
            log.warning("non-finite loss at step %d on %s (%d in a row): optimizer step skipped on every rank",
                        self.global_step, "this rank" if not torch.isfinite(loss) else "another rank",
                        self._nonfinite_in_a_row)
            if self._nonfinite_in_a_row >= self.hparams.max_consecutive_nonfinite:
                raise NonFiniteLossError(f"{self._nonfinite_in_a_row} non-finite losses in a row at step "
                                         f"{self.global_step}: stopping (module.max_consecutive_nonfinite)")
            return loss
        self._nonfinite_in_a_row = 0
        now = time.perf_counter()
        kw = dict(batch_size=bs, sync_dist=False)
        self.log("train/loss", loss.detach(), prog_bar=True, **kw)
        for k, v in extras.items():
            self.log(f"train/{k}", v, **kw)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, **kw)
        if "data_skipped" in batch:
            self.log("data/skipped", float(batch["data_skipped"]), reduce_fx="sum", **kw)
        if self._t_last is not None:
            self.log("train/samples_per_s", bs * self.trainer.world_size / (now - self._t_last), prog_bar=True, **kw)
        self._t_last = now
        return loss

    @staticmethod
    def nonfinite_on_any_rank(loss: torch.Tensor) -> bool:
        """One flag reduced over ranks, so that every rank takes the same decision (one tiny all-reduce)."""
        import torch.distributed as dist

        from blip2_train.distributed.collectives import is_dist

        flag = (~torch.isfinite(loss.detach())).float().reshape(1)
        if is_dist():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        """Skip the update of a window that held a non-finite loss, on every rank: after backward the gradients
        are dropped (None), so AdamW leaves weights and moments untouched; the schedule still advances.
        DeepSpeed keeps gradients in its own buffers: its bf16 `check_overflow` (set by our config) skips there."""

        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

        def closure():
            out = optimizer_closure() if optimizer_closure is not None else None
            if self._skip_optimizer_step:
                if scaler is None:
                    optimizer.zero_grad(set_to_none=True)
                else:  # fp16 AMP: GradScaler skips a step whose gradients hold an inf (and lowers its scale)
                    for g in optimizer.param_groups:
                        for p in g["params"]:
                            if p.grad is not None:
                                p.grad.fill_(float("inf"))
            return out

        try:
            optimizer.step(closure=closure)
        finally:
            self._skip_optimizer_step = False

    def configure_model(self) -> None:
        """Under FSDP2 (strategy=fsdp) the strategy shards the model here, on every rank, before the optimizer is
        built; other strategies have nothing to do."""
        parallelize = getattr(self.trainer.strategy, "parallelize", None) if self._trainer is not None else None
        if parallelize is not None and not getattr(self, "_parallelized", False):
            parallelize(self.model)
            self._parallelized = True

    def configure_optimizers(self):
        hp = self.hparams
        scales = None
        if hp.vision_layer_decay != 1.0:
            if getattr(self.model, "freeze_vision", True):
                raise Blip2TrainError("module.vision_layer_decay < 1 needs an unfrozen ViT (model.freeze_vision=false)")
            scales = layer_decay_scales("hf.vision_model.", self.model.hf.vision_model.config.num_hidden_layers,
                                        hp.vision_layer_decay)
        opt = build_adamw(self.model, hp.lr, hp.weight_decay, hp.betas, no_decay_names=hp.no_decay_names,
                          lr_scales=scales)
        max_steps = hp.max_steps if hp.max_steps and hp.max_steps > 0 else self.trainer.estimated_stepping_batches
        if not max_steps or math.isinf(max_steps):
            raise Blip2TrainError("set trainer.max_steps (or max_epochs with a sized data stream)")
        sched = build_scheduler(opt, int(max_steps), hp.lr, hp.min_lr, hp.warmup_steps, hp.warmup_start_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # Checkpoints hold the trainable weights only (plus optimizer state): a frozen ViT-g or LLM is GBs that
    # never change. `save_frozen_weights=True` keeps everything.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["blip2_stage"] = self.stage
        if self.hparams.save_frozen_weights:
            return
        keep = {"model." + n for n, p in self.model.named_parameters() if p.requires_grad}
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in sd.items() if k in keep}
        checkpoint["frozen_weights_omitted"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        stage = checkpoint.get("blip2_stage")
        if stage is not None and stage != self.stage:
            hints = {1: "to start stage 2 from it, give it as paths.stage1_checkpoint (or its export), not ckpt_path",
                     2: "resume it with the stage-2 experiment it came from (e.g. experiment=stage2_pretrain); to "
                        "instruction-tune it, export it and give the export as paths.stage2_checkpoint "
                        "(experiment=instruct_tune)",
                     3: "resume it with the instruction-tuning experiment it came from (experiment=instruct_tune or "
                        "vqa_vqav2_ft); to start from it, export it and give the export as model.instruct_checkpoint"}
            hint = hints.get(stage, f"a run of stage {self.stage} resumes from its own checkpoints only")
            raise Blip2TrainError(f"ckpt_path: this checkpoint is from a stage-{stage} run and this is a stage-"
                                  f"{self.stage} run: {hint}")
        if checkpoint.get("frozen_weights_omitted") and "state_dict" in checkpoint:  # FSDP2 loads its own
            # the frozen weights as they are, keyed as load_state_dict takes them (a quantised layer's state_dict
            # also lists its quantisation state, which it does not load back)
            own = ({n for n, _ in self.named_parameters(remove_duplicate=False)}
                   | {n for n, _ in self.named_buffers(remove_duplicate=False)})
            full = {k: v for k, v in self.state_dict().items() if k in own}
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    stage = 0
