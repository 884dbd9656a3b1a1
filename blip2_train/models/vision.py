"""The image-encoder side shared by both stages: a frozen (or fine-tuned) ViT and its trainable ln_vision.

`transformers.Blip2VisionModel` applies `post_layernorm` (the reference's `ln_vision`) inside its forward in
the tower's dtype. The reference runs the frozen ViT in half precision but ln_vision in fp32, and keeps
ln_vision trainable while the tower is frozen; `encode_image` reproduces exactly that.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

# The image normalisation the EVA-CLIP ViT was trained with (the reference's, and the exported processor's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def encode_image(vision_model, pixel_values: torch.Tensor, frozen: bool,
                 interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """[B, 3, H, W] -> image tokens [B, N, Dv] in fp32, after ln_vision."""
    return ln_vision(vision_model, vision_tokens(vision_model, pixel_values, frozen, interpolate_pos_encoding))


def vision_tokens(vision_model, pixel_values: torch.Tensor, frozen: bool,
                  interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """[B, 3, H, W] -> image tokens [B, N, Dv] BEFORE ln_vision, in the tower's dtype (bf16/fp16/fp32).

    A frozen tower runs without autograd (no activations kept), in its own dtype, autocast off. An unfrozen
    tower (fine-tuning) keeps fp32 master weights and computes under the caller's autocast (bf16 with
    `trainer.precision=bf16-mixed`), as the reference fine-tunes under AMP. Stage 1 moves these tokens between
    ranks for the ITM negatives: half the bytes of the fp32 output, and no gradient when the tower is frozen.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        with torch.autocast(pixel_values.device.type, enabled=False) if frozen else contextlib.nullcontext():
            x = vision_model.embeddings(pixel_values.to(vision_model.embeddings.patch_embedding.weight.dtype),
                                        interpolate_pos_encoding=interpolate_pos_encoding)
            return vision_model.encoder(inputs_embeds=x).last_hidden_state


def ln_vision(vision_model, x: torch.Tensor) -> torch.Tensor:
    """The trainable ln_vision (`post_layernorm`) in fp32, as the reference; per token, so it can be applied
    to any subset of rows (e.g. only the ITM negatives a rank fetched) with the same result."""
    ln = vision_model.post_layernorm
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)


def freeze_vision_tower(vision_model, dtype: torch.dtype) -> None:
    """No gradient and `dtype` for the blocks; ln_vision (post_layernorm) stays trainable in fp32."""
    for p in vision_model.parameters():
        p.requires_grad_(False)
    for p in vision_model.post_layernorm.parameters():
        p.requires_grad_(True)
    vision_model.embeddings.to(dtype)
    vision_model.encoder.to(dtype)


def interpolate_position_embedding(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1 + g*g, D] -> [1, 1 + n, D] with n = num_patches: bicubic on the patch grid, class token kept.

    Fine-tuning at 364 px from a 224 px tower (the reference's `interpolate_pos_embed`), done once at load
    time so the export's config says 364 and plain transformers needs no `interpolate_pos_encoding` flag.
    """
    old = pos.shape[1] - 1
    if old == num_patches:
        return pos
    g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
    if g_old * g_old != old or g_new * g_new != num_patches:
        raise ValueError(f"position embeddings must form square grids: {old} -> {num_patches} patches")
    cls_tok, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(pos.dtype)
    return torch.cat([cls_tok, grid], dim=1)


def fit_position_embedding(sd: dict, key: str, target: torch.Tensor) -> None:
    """In place: resize `sd[key]` to `target`'s patch count when a checkpoint was trained at another size."""
    if key in sd and sd[key].shape != target.shape:
        sd[key] = interpolate_position_embedding(sd[key], target.shape[1] - 1)


def set_attention(cfg, implementation: str) -> None:
    """Attention kernels for the ViT and the Q-Former of a Blip2Config. The Q-Former has no FlashAttention-2
    path in transformers: with `flash_attention_2` the ViT gets it and the Q-Former falls back to SDPA."""
    cfg.vision_config._attn_implementation = implementation
    cfg.qformer_config._attn_implementation = "sdpa" if implementation == "flash_attention_2" else implementation
