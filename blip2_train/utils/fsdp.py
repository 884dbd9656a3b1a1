"""FSDP auto-wrap by layer class names (the ViT, Q-Former and LLM blocks)."""

from __future__ import annotations

import importlib

_MODULES = (
    "transformers.models.blip_2.modeling_blip_2",
    "transformers.models.opt.modeling_opt",
    "transformers.models.llama.modeling_llama",
    "transformers.models.t5.modeling_t5",
    "transformers.models.gpt2.modeling_gpt2",
)


def wrap_policy(layer_class_names: list[str]) -> set[type]:
    """Names -> the set of classes Lightning's FSDPStrategy accepts as `auto_wrap_policy`."""
    found = {}
    for mod_name in _MODULES:
        mod = importlib.import_module(mod_name)
        for name in layer_class_names:
            if hasattr(mod, name):
                found[name] = getattr(mod, name)
    missing = set(layer_class_names) - set(found)
    if missing:
        raise ValueError(f"FSDP wrap classes not found in transformers: {sorted(missing)}")
    return set(found.values())


def mixed_precision(param_dtype: str = "bfloat16", reduce_dtype: str = "float32", buffer_dtype: str = "bfloat16"):
    """FSDP MixedPrecision from dtype names (compute in bf16, all-reduce gradients in fp32)."""
    import torch
    from torch.distributed.fsdp import MixedPrecision

    def dt(name):
        return getattr(torch, name)

    return MixedPrecision(param_dtype=dt(param_dtype), reduce_dtype=dt(reduce_dtype), buffer_dtype=dt(buffer_dtype))
