"""Reading training checkpoints back into models (shared by blip2-eval and blip2-export)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from blip2_train.utils.errors import CheckpointError

log = logging.getLogger(__name__)


def load_lightning_checkpoint(model, path: str | Path) -> dict:
    """Copy the `model.*` weights of a Lightning checkpoint into `model`; returns the raw checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    sd = {k[len("model."):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("model.")}
    if not sd:
        raise CheckpointError(f"{p}: no model weights (is this a Lightning checkpoint of blip2-train?)")
    own = model.state_dict()
    want = 2 if any(k.startswith("hf.language_model.") for k in own) else 1
    got = ckpt.get("blip2_stage") or (2 if any(k.startswith("hf.language_projection.") for k in sd) else 1)
    if got != want:
        raise CheckpointError(f"{p} is a stage-{got} checkpoint but the model configured here is stage {want} "
                              f"(stage 2 starts from stage 1 through model.stage1_checkpoint)")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise CheckpointError(f"{p} does not fit this model: {len(unexpected)} key(s) have no place, e.g. {unexpected[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise CheckpointError(f"{p}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)
    if ckpt.get("frozen_weights_omitted"):
        log.info("%s holds trainable weights only; frozen weights come from the model config", p)
    return ckpt


def run_config_of(checkpoint: str | Path):
    """The resolved config.yaml of the run a checkpoint belongs to (<run>/checkpoints/x.ckpt)."""
    p = Path(checkpoint).resolve()
    for d in (p.parent, p.parent.parent):
        if (d / "config.yaml").exists():
            return OmegaConf.load(d / "config.yaml")
    raise CheckpointError(f"no config.yaml found beside {p} or in its run directory; pass --config")
