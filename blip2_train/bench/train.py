"""`blip2-bench train`: throughput, model FLOPs utilisation and peak memory of a training step.

Random-initialised models of the real architecture on synthetic tensors (no data loading: this measures the
model step). FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` records every
matmul / attention of one full step (forward, backward, nothing for the optimizer), per top-level part, so
the frozen towers (forward only) and the trained Q-Former (forward + backward) are reported apart.
MFU = counted FLOPs per second / the device's peak (dense bf16 on GPUs; on CPU the measured fp32 matmul
throughput stands in for the peak, and the figure says so).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import torch

# dense (no sparsity) bf16 tensor-core peaks, TFLOP/s
GPU_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.2}

LLM_PRESETS = {
    "opt-2.7b": dict(family="opt", hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2560),
    "opt-6.7b": dict(family="opt", hidden_size=4096, num_hidden_layers=32, ffn_dim=16384, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=4096),
    "llama-7b": dict(family="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008,
                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048),
    # predicted by blip2-bench memory only (bench train builds decoder-only LLMs)
    "flant5-xl": dict(family="t5", d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24,
                      num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "tiny": dict(family="opt", hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=2,
                 vocab_size=512, max_position_embeddings=256, word_embed_proj_dim=64),
    # the llama-7b code path at CPU size (the GPU check's dry run)
    "tiny-llama": dict(family="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                       num_attention_heads=2, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}


def synthetic_bert_tokenizer(out_dir: Path, vocab_size: int = 30522) -> Path:
    """A BERT tokenizer with bert-base-uncased's vocabulary SIZE (the content does not matter for speed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                      mask_token="[MASK]").save_pretrained(str(out_dir))
    return out_dir


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops} TFLOP/s (given)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"{tf} TFLOP/s dense bf16 ({name})"
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    f = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    return f, f"{f / 1e9:.0f} GFLOP/s = measured fp32 matmul on this CPU (stand-in for a peak)"


def build_stage1(model_name: str, image_size: int, tok_dir: Path):
    from hydra.utils import instantiate

    from blip2_train.config.compose import compose

    cfg = compose("train", [f"arch={model_name}", "model=stage1_vitg", f"paths.bert_dir={tok_dir}", "paths.vision_checkpoint=null",
                            f"data.image_size={image_size}", "model.bert_checkpoint=null"])
    return instantiate(cfg.model), cfg


def build_stage2(model_name: str, image_size: int, llm: str, dtype: torch.dtype, device: torch.device):
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from blip2_train.config.compose import compose
    from blip2_train.models.build_stage2 import build_stage2_hf
    from blip2_train.models.stage2 import Blip2Stage2

    cfg = compose("train", [f"arch={model_name}", "model=stage2_opt", "paths.llm_dir=unused", "paths.stage1_checkpoint=null",
                            f"data.image_size={image_size}"])
    preset = dict(LLM_PRESETS[llm])
    family = preset.pop("family")
    lcfg = OPTConfig(**preset) if family == "opt" else LlamaConfig(**preset)
    lcfg._attn_implementation = "sdpa"
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(lcfg, dtype=dtype)
    image_id, end_id = lcfg.vocab_size - 1, 2
    hf = build_stage2_hf(OmegaConf.to_container(cfg.model.vision, resolve=True),
                         OmegaConf.to_container(cfg.model.qformer, resolve=True), lm,
                         cfg.model.num_query_tokens, image_id, end_id, 1, "sdpa")
    model = Blip2Stage2(hf, image_id, end_id, 1, freeze_vision=True,
                        vision_dtype=dtype if device.type == "cuda" else torch.float32)
    return model, cfg


def run(stage: int, model_name: str, batch_size: int, steps: int, warmup: int, image_size: int, llm: str,
        text_len: int, device_name: str, peak_tflops: float | None) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from blip2_train.lit.optim import build_adamw

    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    g = torch.Generator().manual_seed(0)
    if stage == 1:
        with tempfile.TemporaryDirectory() as d:
            model, cfg = build_stage1(model_name, image_size, synthetic_bert_tokenizer(Path(d) / "tok"))
        vocab = model.config.qformer_config.vocab_size
        ids = torch.randint(5, vocab - 1, (batch_size, text_len), generator=g)
        ids[:, 0] = 2  # [CLS]
        batch = dict(pixel_values=torch.randn(batch_size, 3, image_size, image_size, generator=g), input_ids=ids,
                     attention_mask=torch.ones_like(ids), image_ids=torch.arange(batch_size))
        tokens_per_sample = model.num_query_tokens + text_len
    else:
        model, cfg = build_stage2(model_name, image_size, llm, dtype, device)
        q = model.num_query_tokens
        ids = torch.randint(5, model.image_token_id - 1, (batch_size, q + text_len), generator=g)
        ids[:, :q] = model.image_token_id
        labels = ids.clone()
        labels[:, :q] = -100
        batch = dict(pixel_values=torch.randn(batch_size, 3, image_size, image_size, generator=g), input_ids=ids,
                     attention_mask=torch.ones_like(ids), labels=labels)
        tokens_per_sample = q + text_len
    model.to(device)
    if stage == 2:
        model.llm.to(dtype)
    model.set_train_modes(True)
    batch = {k: v.to(device) for k, v in batch.items()}
    opt = build_adamw(model, 1e-5)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    parts = {"vision_model": "frozen ViT (forward)", "qformer": "Q-Former", "language_model": "frozen LLM",
             "language_projection": "projection"}
    counter = FlopCounterMode(display=False, depth=None)
    with counter:
        step()
    total = counter.get_total_flops()
    by_module = counter.get_flop_counts()
    breakdown = {}
    for key, label in parts.items():
        # the outermost modules of each part that ran (stage 1 calls the ViT's embeddings/encoder directly)
        cands = [m for m in by_module if (".hf." + key) in ("." + m) and
                 (("." + m).split(".hf." + key, 1)[1] == "" or ("." + m).split(".hf." + key, 1)[1].startswith("."))]
        outer = [m for m in cands if not any(m.startswith(o + ".") for o in cands if o != m)]
        if outer:
            breakdown[label] = sum(sum(by_module[m].values()) for m in outer)
    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak, peak_text = peak_flops(device, peak_tflops)
    mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if on_gpu
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    params = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    return {"stage": stage, "model": model_name, "llm": llm if stage == 2 else None, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores)",
            "batch_size": batch_size, "image_size": image_size, "step_seconds": dt,
            "samples_per_s": batch_size / dt, "tokens_per_s": batch_size * tokens_per_sample / dt,
            "flops_per_sample": total / batch_size, "breakdown_per_sample": {k: v / batch_size for k, v in breakdown.items()},
            "achieved_tflops": total / dt / 1e12, "mfu": total / dt / peak, "peak": peak_text,
            "peak_memory_gib": mem, "memory_kind": "torch.cuda.max_memory_allocated" if on_gpu else "process max RSS",
            "peak_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2 ** 30 if on_gpu else None,
            "params": params, "steps": steps, "warmup": warmup, "text_len": text_len, "torch": torch.__version__,
            "cuda": torch.version.cuda if on_gpu else None}


def markdown(r: dict, command: str) -> str:
    parts = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in r["breakdown_per_sample"].items())
    return "\n".join([
        f"## Training step, stage {r['stage']}, `{r['model']}`" + (f" + {r['llm']}" if r["llm"] else "") +
        f" on {r['device_name']}\n",
        f"Command: `{command}`  ",
        f"Batch {r['batch_size']}, {r['image_size']} px; peak: {r['peak']}.\n",
        "| samples/s | tokens/s | TFLOP/s achieved | MFU | peak memory (GiB) | GFLOP per sample |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['achieved_tflops']:.3f} | {100 * r['mfu']:.1f}% | "
        f"{r['peak_memory_gib']:.2f} ({r['memory_kind']}) | {r['flops_per_sample'] / 1e9:.2f} |",
        f"\nGFLOP per sample by part (counted, forward+backward where trained): {parts}."])
