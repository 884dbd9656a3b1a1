"""Tiny real models and the overrides every CLI test starts from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def tiny_cli(synth, *overrides) -> list[str]:
    """The Hydra overrides every CLI test starts from: preset=tiny on the synthetic world, CPU, no logger."""
    return ["preset=tiny", f"paths.data_dir={synth['dir']}", "trainer=cpu", "logger=none", "callbacks.progress=null",
            "data.num_workers=0", *overrides]


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, layer_norm_eps=1e-6, initializer_range=0.02)
TINY_QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                    initializer_range=0.07)


def tiny_stage1(tokenizer_dir, seed: int = 0, **kw):
    from blip2_train.models.build_stage1 import build_stage1_model

    args = dict(tokenizer=str(tokenizer_dir), vision=TINY_VISION, qformer=TINY_QFORMER, num_query_tokens=4,
                embed_dim=16, seed=seed, attn_implementation="eager")
    args.update(kw)
    return build_stage1_model(**args)


def batch_of(tokenizer, captions, image_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = tokenizer(captions, padding="longest", return_tensors="pt")
    return torch.randn(len(captions), 3, image_size, image_size, generator=g), tok["input_ids"], tok["attention_mask"]


def read_json(p):
    return json.loads(Path(p).read_text())


def tiny_stage2(llm_dir, stage1=None, **kw):
    from blip2_train.models.build_stage2 import build_stage2_model

    args = dict(llm=str(llm_dir), vision=TINY_VISION, qformer=TINY_QFORMER, num_query_tokens=4, llm_dtype="float32",
                stage1_checkpoint=str(stage1) if stage1 else None, attn_implementation="eager",
                llm_attn_implementation="eager", seed=0)
    args.update(kw)
    return build_stage2_model(**args)
