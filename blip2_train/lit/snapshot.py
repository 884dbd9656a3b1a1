"""Weights-only snapshots: the trainable weights in bf16, every N steps, beside the full checkpoints.

A full checkpoint carries fp32 weights and AdamW's two moments (12 B per trainable parameter: 2.24 GB for stage 1
at real size, 1.29 GB for stage 2 over OPT-2.7B) and is what a resume needs. Evaluating or exporting a step needs
the weights only: 2 B per trainable parameter in bf16 (0.37 GB / 0.21 GB), so snapshots can be taken far more
often and kept. A snapshot is a Lightning-style `.ckpt` dict (`state_dict` of the trainable `model.*` weights,
`blip2_stage`, `global_step`, `frozen_weights_omitted`) in `<run>/snapshots/`, so `blip2-export` reads it as it
reads a checkpoint (and its export is what blip2-eval and the next stage take); it holds no optimizer state, so
it is not a resume point (`ckpt_path=auto` only looks in `checkpoints/`).

Under FSDP2 every rank takes part in gathering each sharded weight (`DTensor.full_tensor`), and rank 0 writes;
under DDP and ZeRO-1/2 the weights are whole on every rank. ZeRO-3 is refused at the start (its weights are
partitioned in DeepSpeed's own format): export its sharded checkpoints with `blip2-export` instead. "Step" is
the trainer's `global_step`, as in checkpoint names: under DeepSpeed, which accumulates gradients itself, Lightning
counts micro-batches there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blip2_train.lit.periodic import EveryNSteps
from blip2_train.lit.checkpoint_io import AtomicCheckpointIO
from blip2_train.utils.errors import ConfigError

log = logging.getLogger(__name__)


class WeightsSnapshot(EveryNSteps):
    def __init__(self, every_n_steps: int = 0, dirpath: str = "snapshots", dtype: str = "bfloat16",
                 keep_last: int | None = None):
        if every_n_steps < 0 or (keep_last is not None and keep_last < 1):
            raise ConfigError("callbacks.weights_snapshot: every_n_steps must be >= 0 (0 = off) and keep_last >= 1 "
                              f"or null (keep all), not {every_n_steps} / {keep_last}")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError(f"callbacks.weights_snapshot.dtype must be bfloat16, float16 or float32, not {dtype!r}")
        super().__init__(every_n_steps)
        self.dirpath, self.keep_last = Path(dirpath), keep_last
        self.dtype = getattr(torch, dtype)

    def setup(self, trainer, pl_module, stage: str) -> None:
        strategy = trainer.strategy
        if self.every_n_steps and getattr(strategy, "zero_stage_3", False):
            raise ConfigError("callbacks.weights_snapshot does not run under ZeRO-3 (partitioned weights): set "
                              "callbacks.weights_snapshot.every_n_steps=0 and export a checkpoint with blip2-export")

    def at_step(self, trainer, pl_module, step: int) -> None:
        self.save(trainer, pl_module, step)

    def save(self, trainer, pl_module, step: int) -> Path:
        weights = {}
        for name, p in pl_module.model.named_parameters():  # same order on every rank: the gathers match
            if not p.requires_grad:
                continue
            t = p.detach()
            if hasattr(t, "full_tensor"):  # an FSDP2 shard (DTensor): every rank gathers, rank 0 keeps it
                t = t.full_tensor()
            if trainer.is_global_zero:
                weights["model." + name] = t.to(device="cpu", dtype=self.dtype).clone()
        path = self.dirpath / f"step{step:07d}.ckpt"
        if trainer.is_global_zero:
            # same-directory temp file, fsync, rename: a snapshot killed half-way never appears under its name
            AtomicCheckpointIO().save_checkpoint(
                {"state_dict": weights, "blip2_stage": pl_module.stage, "global_step": step,
                 "frozen_weights_omitted": True, "weights_only_snapshot": str(self.dtype)}, path)
            log.info("weights snapshot %s: %d trainable tensors in %s, %.1f MB", path, len(weights),
                     str(self.dtype).removeprefix("torch."), path.stat().st_size / 2**20)
            self._prune(step)
        trainer.strategy.barrier("weights_snapshot")
        return path

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` snapshots up to this step. Later ones were left by a run that was killed
        and resumed from an earlier checkpoint: this run writes those steps again (and replaces them)."""
        if self.keep_last is None:
            return
        mine = sorted(p for p in self.dirpath.glob("step*.ckpt") if p.stem[4:].isdigit() and int(p.stem[4:]) <= step)
        for old in mine[: -self.keep_last]:
            old.unlink()
