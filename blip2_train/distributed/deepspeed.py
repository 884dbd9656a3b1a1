"""DeepSpeed configuration generated from the Hydra config and validated before any GPU work.

`conf/strategy/deepspeed_zero{2,3}.yaml` point here: the ZeRO stage and offload flags come from the strategy
group; micro batch, accumulation, clipping, precision and world size from the data/trainer groups, so the
numbers cannot disagree. The full config (with the global batch) is checked with DeepSpeed's own
`DeepSpeedConfig` plus the batch arithmetic DeepSpeed can only check once processes exist; Lightning then gets
the config without the keys it insists on setting itself (gradient_accumulation_steps).

Checkpoints leave the frozen weights out (`module.save_frozen_weights`, as under DDP and FSDP2): Lightning's
DeepSpeed strategy keeps them by default, and DeepSpeed then writes a frozen ViT-g + OPT-2.7B into every save,
under ZeRO-2 twice on GPU (the module state, and `frozen_param_fragments`: CPU copies): 14.6 GB in bf16 beside
1.29 GB of optimizer state. DeepSpeed's own `exclude_frozen_parameters` drops each frozen parameter under one
name only, so a tied alias (OPT's `lm_head.weight` = its input embedding, 257 MB) stays: `save_checkpoint` here
drops every name of a frozen parameter. Resuming such a checkpoint needs a load that accepts the missing frozen
keys and nothing else (Lightning's is strict or not at all): `load_trainable_state`.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy

from blip2_train.utils.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

PRECISIONS = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16-true": "fp16",
              "16": "fp16", "32-true": None, "32": None}


def build_deepspeed_config(stage: int, micro_batch_size: int, accumulate_grad_batches: int = 1, world_size: int = 1,
                           precision: str = "bf16-mixed", gradient_clip_val: float | None = None,
                           offload_optimizer: bool = False, offload_parameters: bool = False,
                           reduce_bucket_size: float = 2e8, allgather_bucket_size: float = 2e8,
                           stage3_param_persistence_threshold: float = 1e5, overlap_comm: bool = True) -> dict:
    """The complete DeepSpeed config for this run (global batch included)."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"strategy.stage must be 0-3 (ZeRO stage), not {stage!r}")
    if offload_parameters and stage != 3:
        raise ConfigError("strategy.offload_parameters needs ZeRO stage 3 (strategy=deepspeed_zero3)")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not supported with DeepSpeed; use one of {sorted(PRECISIONS)}")
    for name, v in (("data.batch_size", micro_batch_size), ("trainer.accumulate_grad_batches", accumulate_grad_batches),
                    ("trainer.devices x trainer.num_nodes", world_size)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be a positive integer for DeepSpeed, not {v!r}")
    zero: dict = {"stage": stage, "overlap_comm": overlap_comm, "contiguous_gradients": True,
                  "reduce_bucket_size": int(reduce_bucket_size)}
    if stage in (1, 2):
        zero["allgather_bucket_size"] = int(allgather_bucket_size)
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = int(stage3_param_persistence_threshold)
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # sharded saves; blip2-export consolidates
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulate_grad_batches,
        "train_batch_size": micro_batch_size * accumulate_grad_batches * world_size,
        "gradient_clipping": float(gradient_clip_val or 0.0),
        "zero_optimization": zero,
        # AdamW comes from the LightningModule (param groups, no-decay rules): DeepSpeed must accept it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    kind = PRECISIONS[precision]
    if kind == "bf16":
        # A non-finite gradient skips the step on every rank (ZeRO checks all partitions), as fp16 does: a NaN
        # on one rank cannot reach the weights (the module counts the skip). Explicit: older DeepSpeed had it off.
        cfg["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif kind == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def validate_deepspeed_config(cfg: dict, world_size: int) -> None:
    """DeepSpeed's own validator on the per-process view, plus the global batch arithmetic."""
    from deepspeed.runtime.config import DeepSpeedConfig

    micro, acc = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    if cfg["train_batch_size"] != micro * acc * world_size:
        raise ConfigError(f"DeepSpeed batch sizes disagree: train_batch_size {cfg['train_batch_size']} != micro "
                          f"{micro} x accumulation {acc} x world {world_size}")
    local = copy.deepcopy(cfg)
    local["train_batch_size"] = micro * acc  # DeepSpeedConfig sees world size 1 without a process group
    try:
        DeepSpeedConfig(local)
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"invalid DeepSpeed config: {e}") from e


def frozen_names(module) -> set[str]:
    """Every name of every frozen parameter, tied aliases included (`named_parameters` lists a shared one once)."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def load_trainable_state(src: dict, dst) -> None:
    """DeepSpeed's `custom_load_fn`: load a module state that may lack the frozen weights. Every key must have a
    place, and every trainable parameter must be there; frozen ones missing from the file keep their values
    (they come from the model config, as the pretrained ViT / LLM did when the run started)."""
    result = dst.load_state_dict(src, strict=False)
    frozen = frozen_names(dst)
    missing = sorted(k for k in result.missing_keys if k not in frozen)
    if missing or result.unexpected_keys:
        parts = [f"{len(missing)} trainable weight(s) missing, e.g. {missing[:3]}"] if missing else []
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} key(s) with no place, e.g. {sorted(result.unexpected_keys)[:3]}")
        raise CheckpointError("DeepSpeed checkpoint does not fit this model: " + "; ".join(parts))
    if result.missing_keys:
        log.info("DeepSpeed checkpoint holds trainable weights only: %d frozen tensors keep the model config's values",
                 len(result.missing_keys))


def load_deepspeed_checkpoint(engine, path, load_optimizer_states: bool) -> dict | None:
    """The engine's load with `load_trainable_state` (the rest as Lightning's DeepSpeed resume: no lr scheduler
    state, Lightning restores that); returns the client state (Lightning's part of the checkpoint)."""
    _, client_state = engine.load_checkpoint(str(path), load_optimizer_states=load_optimizer_states,
                                             load_lr_scheduler_states=False, custom_load_fn=load_trainable_state)
    return client_state


class Blip2DeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, saving trainable weights + optimizer state only unless
    `save_frozen_weights`, and resuming such checkpoints (`load_deepspeed_checkpoint`)."""

    def __init__(self, *args, save_frozen_weights: bool = False, **kwargs):
        super().__init__(*args, exclude_frozen_parameters=not save_frozen_weights, **kwargs)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any | None = None) -> None:
        engine = self.deepspeed_engine
        if not self.exclude_frozen_parameters or "module_state_dict" in vars(engine):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        frozen, own = frozen_names(engine.module), engine.module_state_dict

        def trainable_state(*args, **kwargs):  # what DeepSpeed writes as `module`, tied frozen aliases dropped too
            return OrderedDict((k, v) for k, v in own(*args, **kwargs).items() if k not in frozen)

        engine.module_state_dict = trainable_state  # for this save only (an instance attribute, removed below)
        try:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            del engine.module_state_dict

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if self.load_full_weights and self.zero_stage_3:  # one consolidated file: the parent's path
            return super().load_checkpoint(checkpoint_path, weights_only)
        from lightning.pytorch.strategies.deepspeed import _validate_checkpoint_directory
        from lightning.pytorch.trainer.states import TrainerFn

        _validate_checkpoint_directory(checkpoint_path)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        client_state = load_deepspeed_checkpoint(self.deepspeed_engine, checkpoint_path, fitting)
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load {checkpoint_path} (no `latest` tag or model states)")
        return client_state


def deepspeed_strategy(stage: int, micro_batch_size: int, accumulate_grad_batches: int = 1, devices="auto",
                       num_nodes: int = 1, precision: str = "bf16-mixed", gradient_clip_val: float | None = None,
                       offload_optimizer: bool = False, offload_parameters: bool = False,
                       save_frozen_weights: bool = False, **zero_kw):
    """The `_target_` of the DeepSpeed strategy configs: build, validate, hand to Lightning."""
    world_size = _world_size(devices, num_nodes)
    cfg = build_deepspeed_config(stage, micro_batch_size, accumulate_grad_batches, world_size, precision,
                                 gradient_clip_val, offload_optimizer, offload_parameters, **zero_kw)
    validate_deepspeed_config(cfg, world_size)
    for key in ("gradient_accumulation_steps", "train_batch_size", "bf16", "fp16"):
        cfg.pop(key, None)  # Lightning sets these from the Trainer (and refuses some of them in the config)
    log.info("DeepSpeed ZeRO-%d config validated (world size %d, global batch %d)", stage, world_size,
             micro_batch_size * accumulate_grad_batches * world_size)
    return Blip2DeepSpeedStrategy(config=cfg, save_frozen_weights=save_frozen_weights)


def _world_size(devices, num_nodes: int) -> int:
    if isinstance(devices, int):
        per_node = devices
    elif isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    else:  # "auto" / -1: what is visible
        import torch

        per_node = max(1, torch.cuda.device_count())
    return per_node * int(num_nodes)
