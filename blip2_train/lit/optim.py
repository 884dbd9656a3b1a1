"""AdamW parameter groups and the step-based warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: Iterable[str] = ("temp", "query_tokens"),
                 lr_scales: dict[str, float] | None = None) -> list[dict]:
    """Weight decay on weights only: not on biases, 1-d params (norms) or the names listed.

    The reference decays `temp` and `query_tokens` by accident of its `ndim < 2` rule (query_tokens is 3-d);
    here that choice is explicit: list them in `no_decay_names` (default) or not.
    `lr_scales`: {name prefix: factor}, e.g. a smaller lr for an unfrozen ViT.
    """
    no_decay_names = tuple(no_decay_names)
    lr_scales = dict(lr_scales or {})
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split(".")[-1]
        decay = not (p.ndim < 2 or name.endswith(".bias") or short in no_decay_names or name in no_decay_names)
        scale = next((f for prefix, f in lr_scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


def build_adamw(model: nn.Module, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.999), eps: float = 1e-8,
                no_decay_names=("temp", "query_tokens"), lr_scales=None, fused: bool | None = None):
    groups = param_groups(model, weight_decay, no_decay_names, lr_scales)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kw = {"fused": True} if (fused if fused is not None else on_cuda) else {}  # fused AdamW: one kernel per step
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


def warmup_cosine(step: int, max_steps: int, base_lr: float, min_lr: float, warmup_steps: int,
                  warmup_start_lr: float) -> float:
    """Linear warmup warmup_start_lr -> base_lr, then cosine base_lr -> min_lr by max_steps (per STEP: the
    reference warms up in epoch 0 only and then steps the cosine per epoch)."""
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, max_steps: int, base_lr: float, min_lr: float, warmup_steps: int,
                    warmup_start_lr: float) -> LambdaLR:
    def factor(step: int) -> float:
        return warmup_cosine(step, max_steps, base_lr, min_lr, warmup_steps, warmup_start_lr) / base_lr

    return LambdaLR(optimizer, factor)


def layer_decay_scales(prefix: str, num_layers: int, decay: float) -> dict[str, float]:
    """Layer-wise lr decay for a fine-tuned ViT (BEiT/EVA style): block i gets decay^(L - i), the embeddings
    decay^(L + 1), ln_vision (post_layernorm) the full lr. Keys are name prefixes for `param_groups`."""
    scales = {f"{prefix}encoder.layers.{i}.": decay ** (num_layers - i) for i in range(num_layers)}
    scales[f"{prefix}embeddings."] = decay ** (num_layers + 1)
    return scales
