"""Weight maps between the reference (LAVIS), BERT, transformers and this project's module names.

Our stage-1 module names are transformers' `Blip2ForImageTextRetrieval` names under `hf.`, plus `lm_head.*`
(the reference's `Qformer.cls.*`) and `temp`. Every loader reports keys it could not place: nothing is
silently ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from blip2_train.utils.errors import CheckpointError

# --- BERT-style Q-Former names (reference `Qformer.bert.*`, bert-base-uncased `bert.*`) -> transformers ----


def bert_key_to_qformer(key: str) -> str | None:
    """`bert.`-relative key -> our key, or None where the Q-Former has no place for it."""
    if key.startswith("embeddings."):
        rest = key[len("embeddings."):]
        if rest.startswith(("word_embeddings.", "position_embeddings.")):
            return "hf.embeddings." + rest
        if rest.startswith("LayerNorm."):
            return "hf.qformer.layernorm." + rest[len("LayerNorm."):]
        return None  # token_type_embeddings, position_ids: BLIP-2 uses neither
    m = re.match(r"encoder\.layer\.(\d+)\.(.*)", key)
    if not m:
        return None
    i, rest = m.groups()
    rest = rest.replace("attention.self.", "attention.attention.").replace("crossattention.self.", "crossattention.attention.")
    return f"hf.qformer.encoder.layer.{i}.{rest}"


def cls_key_to_lm_head(key: str) -> str:
    return "lm_head." + key[len("cls."):]


# --- the reference's EVA ViT -> transformers Blip2VisionModel --------------------------------------------

_VIT_RULES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.weight$", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
]


def reference_to_ours(ref: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a reference stage-1 state dict (`blip2_pretrained.pth` layout) to our names.

    Returns (mapped, unmatched keys). `attn.q_bias` / `attn.v_bias` become `qkv.bias = cat(q, 0, v)`.
    """
    out, unmatched, qv_bias = {}, [], {}
    for key, value in ref.items():
        if key.startswith("visual_encoder."):
            k = key[len("visual_encoder."):]
            m = re.match(r"blocks\.(\d+)\.attn\.(q|v)_bias$", k)
            if m:
                qv_bias.setdefault(int(m.group(1)), {})[m.group(2)] = value
                continue
            for pat, rep in _VIT_RULES:
                if re.search(pat, k):
                    out["hf.vision_model." + re.sub(pat, rep, k)] = value
                    break
            else:
                unmatched.append(key)
        elif key.startswith("ln_vision."):
            out["hf.vision_model.post_layernorm." + key[len("ln_vision."):]] = value
        elif key.startswith("Qformer.bert."):
            k = bert_key_to_qformer(key[len("Qformer.bert."):])
            if k is None:
                if not key.endswith("position_ids"):
                    unmatched.append(key)
                continue
            out[k] = value
        elif key.startswith("Qformer.cls."):
            out[cls_key_to_lm_head(key[len("Qformer."):])] = value
        elif key == "query_tokens":
            out["hf.query_tokens"] = value
        elif key.startswith(("vision_proj.", "text_proj.")):
            head, rest = key.split(".", 1)
            out[f"hf.{head.replace('_proj', '_projection')}.{rest}"] = value
        elif key.startswith("itm_head."):
            out["hf." + key] = value
        elif key == "temp":
            out["temp"] = value.reshape(1)
        else:
            unmatched.append(key)
    for i, qv in qv_bias.items():
        q, v = qv["q"], qv["v"]
        out[f"hf.vision_model.encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out, unmatched


# The reference's stage-2 checkpoints (blip2_pretrained_opt2.7b.pth, blip2_caption_flant5xl.pth, ...) hold the
# stage-1 parts it keeps (visual_encoder.*, ln_vision.*, query_tokens, the Q-Former's query path) plus the
# projection into the LLM, named after the LLM family; never the LLM itself.
REFERENCE_PROJECTIONS = {"opt_proj.": "opt", "t5_proj.": "t5", "llm_proj.": "llm"}
# The heads only a stage-1 checkpoint has.
STAGE1_ONLY = ("Qformer.cls.", "vision_proj.", "text_proj.", "itm_head.", "temp")


def reference_projection_family(ref: dict[str, torch.Tensor]) -> str | None:
    """"opt" / "t5" for a reference stage-2 state dict, None for one without a projection (stage 1)."""
    found = {fam for k in ref for prefix, fam in REFERENCE_PROJECTIONS.items() if k.startswith(prefix)}
    if len(found) > 1:
        raise CheckpointError(f"a reference checkpoint with both {sorted(found)} projections")
    return found.pop() if found else None


def is_reference_instruct(ref: dict[str, torch.Tensor]) -> bool:
    """An InstructBLIP file (instruct_blip_vicuna7b_trimmed.pth, instruct_blip_flanxl_trimmed.pth): the Vicuna one
    names its projection llm_proj; both keep the Q-Former's word embeddings, which a stage-2 file drops."""
    return any(k.startswith("llm_proj.") for k in ref) or (
        reference_projection_family(ref) is not None and "Qformer.bert.embeddings.word_embeddings.weight" in ref)


def reference_stage2_to_ours(ref: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A reference stage-2 state dict -> our names (`hf.*`); `opt_proj.*` / `t5_proj.*` become
    `hf.language_projection.*`. Returns (mapped, unmatched keys)."""
    proj = {k: v for k, v in ref.items() if k.startswith(tuple(REFERENCE_PROJECTIONS))}
    out, unmatched = reference_to_ours({k: v for k, v in ref.items() if k not in proj})
    for k, v in proj.items():
        out["hf.language_projection." + k.split(".", 1)[1]] = v
    return out, unmatched


def ours_to_reference(sd: dict[str, torch.Tensor], projection: str | None = None) -> dict[str, torch.Tensor]:
    """The inverse map (for round-trip tests and for users who need the LAVIS layout back). With `projection`
    ("opt" / "t5"), a stage-2 model's `language_projection` becomes `<projection>_proj` (the LLM is left out,
    as in the reference's stage-2 files)."""
    out = {}
    inv_vit = [
        (r"^embeddings\.class_embedding$", "cls_token"), (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.weight$", r"blocks.\1.attn.qkv.weight"),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    ]
    for key, value in sd.items():
        if key.startswith("hf.vision_model."):
            k = key[len("hf.vision_model."):]
            if k.startswith("post_layernorm."):
                out["ln_vision." + k[len("post_layernorm."):]] = value
                continue
            m = re.match(r"encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", k)
            if m:
                q, _, v = value.chunk(3)
                out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
                out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
                continue
            for pat, rep in inv_vit:
                if re.search(pat, k):
                    out["visual_encoder." + re.sub(pat, rep, k)] = value
                    break
        elif key.startswith("hf.embeddings."):
            out["Qformer.bert.embeddings." + key[len("hf.embeddings."):]] = value
        elif key.startswith("hf.qformer.layernorm."):
            out["Qformer.bert.embeddings.LayerNorm." + key[len("hf.qformer.layernorm."):]] = value
        elif key.startswith("hf.qformer.encoder."):
            k = key[len("hf.qformer."):].replace("attention.attention.", "attention.self.")
            out["Qformer.bert." + k] = value
        elif key.startswith("lm_head."):
            out["Qformer.cls." + key[len("lm_head."):]] = value
        elif key == "hf.query_tokens":
            out["query_tokens"] = value
        elif key.startswith(("hf.vision_projection.", "hf.text_projection.")):
            head, rest = key[3:].split(".", 1)
            out[f"{head.replace('_projection', '_proj')}.{rest}"] = value
        elif key.startswith("hf.itm_head."):
            out[key[3:]] = value
        elif key == "temp":
            out["temp"] = value.reshape(())  # the reference's 0-d scalar
        elif key.startswith("hf.language_projection.") and projection:
            out[f"{projection}_proj." + key[len("hf.language_projection."):]] = value
    return out


# --- file readers --------------------------------------------------------------------------------------


def load_hf_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (single or sharded safetensors, or .bin)."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {d}")
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(d / f)))
        return sd
    if (d / "model.safetensors").exists():
        return load_file(str(d / "model.safetensors"))
    if (d / "pytorch_model.bin").exists():
        return torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CheckpointError(f"{d}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_reference_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"reference checkpoint not found: {p}")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    return ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str,
              allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Copy `sd` into `module` with shape checks. Raises on unexpected keys or shape mismatches; returns the
    module's keys that `sd` did not cover (the caller decides whether that is acceptable)."""
    own = module.state_dict()
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise CheckpointError(f"{what}: {len(unexpected)} key(s) have no place in the model, e.g. {unexpected[:5]}")
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch for {len(bad)} key(s), e.g. {bad[:3]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    missing = [k for k in own if k not in sd and not any(k.startswith(a) for a in allow_missing)]
    return missing


# --- BLIP-2 names -> InstructBLIP names (transformers InstructBlipForConditionalGeneration) --------------------

# Stage-1 parts with no place in InstructBLIP: the ITC/ITM heads, the Q-Former's LM head, the temperature.
STAGE1_HEADS = ("vision_projection.", "text_projection.", "itm_head.", "lm_head.", "temp")


def blip2_to_instruct(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers BLIP-2 names (no `hf.` prefix; stage 1 or stage 2) -> InstructBLIP names. The Q-Former's
    embedding LayerNorm and (stage 1) its word and position embeddings move under `qformer.embeddings.`.
    Returns (mapped, the stage-1 heads dropped)."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(STAGE1_HEADS):
            dropped.append(k)
        elif k.startswith("qformer.layernorm."):
            out["qformer.embeddings.layernorm." + k[len("qformer.layernorm."):]] = v
        elif k.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.")):
            out["qformer." + k] = v
        else:
            out[k] = v
    return out, dropped
