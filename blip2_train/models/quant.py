"""Frozen towers held in 8-bit or 4-bit NF4 (QLoRA's recipe: NF4 storage, double quantisation of the scales,
compute in the LLM's dtype), through bitsandbytes.

Why bitsandbytes: it is what QLoRA defined NF4 with, transformers loads an LLM quantised tensor by tensor through
it (`BitsAndBytesConfig`: a 7B model never exists in bf16 in memory), peft's LoRA layers wrap its `Linear4bit` /
`Linear8bitLt`, and since 0.45 the same kernels run on CPU, so the tests here run the very path a GPU runs.

Only `nn.Linear` layers are quantised; embeddings, norms and the LM head stay in the compute dtype (transformers
keeps the head unquantised: the loss reads its weight directly).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from blip2_train.utils.errors import ConfigError

QUANT_KINDS = ("int8", "nf4")
# Bytes per weight of a quantised Linear, scales included: NF4 = 4 bits + one fp32 absmax per 64 weights,
# itself quantised to 8 bits per 256 blocks (double quantisation); int8 = 1 byte + one fp32 scale per row.
BYTES_PER_WEIGHT = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}


def check_kind(kind: str | None, key: str) -> str | None:
    if kind in (None, "none", "null"):
        return None
    if kind not in QUANT_KINDS:
        raise ConfigError(f"{key}: {kind!r} is not one of null, {', '.join(QUANT_KINDS)}")
    return kind


def require_bitsandbytes(key: str) -> None:
    try:
        _import_bnb()
    except ImportError:
        raise ConfigError(f"{key} needs bitsandbytes: pip install bitsandbytes") from None


def _import_bnb():
    # On a CPU without AVX512-BF16 kernels bitsandbytes looks for a hub kernel and logs a warning when there is
    # none; its own CPU path is used either way.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


def bnb_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for loading an LLM quantised (`from_pretrained(quantization_config=)`)."""
    from transformers import BitsAndBytesConfig

    _import_bnb()
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def local_device() -> torch.device:
    """This process's GPU (torchrun's LOCAL_RANK, SLURM's SLURM_LOCALID), made current: the model is built before
    Lightning sets each rank's device, and quantisation happens on the way to the GPU, so without this every rank
    would quantise its copy on GPU 0. The CPU where there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    index = int(rank) % torch.cuda.device_count() if rank is not None else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def device_map() -> dict:
    """Where transformers puts a quantised LLM while loading it (quantisation happens on the way there)."""
    d = local_device()
    return {"": d.index if d.type == "cuda" else "cpu"}


@torch.no_grad()
def quantize_linears(module: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` by its bitsandbytes form holding the same weights (frozen);
    -> how many were replaced. For a tower built in memory (the ViT), where transformers' loader is not used."""
    bnb = _import_bnb()
    device = local_device()
    count = 0
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear):
            continue
        w = child.weight.detach().to(compute_dtype).cpu()
        if kind == "nf4":
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
        else:
            q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.detach().to(compute_dtype).cpu(), requires_grad=False)
        q = q.to(device)  # bitsandbytes quantises here
        keep_cpu_inference_general(q)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, q)
        count += 1
    return count


def keep_cpu_inference_general(module: nn.Module) -> None:
    """bitsandbytes repacks an NF4 weight for its AVX512-BF16 CPU kernel at the first inference call, which
    assumes at least one 64-weight block per row and rows in multiples of 32: a layer narrower than that (the
    tiny test models) fails there. Such layers keep the general path, the one training uses."""
    for m in module.modules():
        if hasattr(m, "support_avx512bf16_for_cpu") and (m.in_features % 64 or m.out_features % 32):
            m.support_avx512bf16_for_cpu = False


def is_quantized(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())
