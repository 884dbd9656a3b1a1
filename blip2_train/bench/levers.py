"""`blip2-bench levers`: what the training-step speed levers of the Q-Former buy, measured in ONE run.

Three variants of the same stage-1 model (same seed, same batch, same hard negatives), each a full step (ITC +
ITM + LM forward, backward, AdamW): eager attention, SDPA (`model.attn_implementation=sdpa`, the default), and
SDPA with the Q-Former compiled (`model.compile_qformer=true`). The rounds are interleaved and the best step
time of each variant kept, so a busy shared machine slows every variant alike rather than one. Every lever must
keep the result: the first step's losses and gradients of each variant are compared with eager's, and the run
fails if they differ by more than fp32 rounding. Host syncs of a step are counted (`blip2_train.utils.syncs`).

Sizes (`--size`):
- `cpu`: BERT-base layers (768 wide, 12 heads of 64, FFN 3072, cross-attention every 2nd) but 4 of them, not 12,
  32 queries, 32 text tokens, over a small frozen ViT (ViT-S/16 width, 6 blocks, 224 px: 197 image tokens, near
  ViT-g's 257), 2 images: every attention has the real Q-Former's shape (what SDPA and compile act on), and depth
  only multiplies the time of a layer; 12 layers take over a minute a step on 2 shared cores. Dropout off: CPU SDPA
  has no kernel with dropout (it falls back to the math path, the same work as eager), and equal losses need it
  off anyway;
- `real` (GPU): the paper's stage 1 (arch=vitg, 224 px, batch 100), dropout as configured (0.1), bf16 autocast;
- `tiny`: a CI-sized run of the same code (the GPU check's CPU dry run and the tests).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from blip2_train.utils.syncs import count_host_syncs

VARIANTS = ("eager", "sdpa", "sdpa+compile")

BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, layer_norm_eps=1e-12, cross_attention_frequency=2)
SIZES = {
    "cpu": dict(vision=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                            image_size=224, patch_size=16, layer_norm_eps=1e-6, qkv_bias=True),
                qformer=dict(BERT_BASE, num_hidden_layers=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                num_query_tokens=32, batch_size=2, text_len=32, vocab_size=30522),
    "real": dict(arch="vitg", batch_size=100, text_len=32, vocab_size=30522),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8, layer_norm_eps=1e-6),
                 qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                 num_query_tokens=4, batch_size=3, text_len=8, vocab_size=120),
}
# fp32 rounding over a 12-layer forward and backward: relative to the eager figure
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


class HostSyncsPerStep(L.Callback):
    """The host syncs of each training batch, from its `on_train_batch_start` to the next one's: the step,
    backward, optimizer, hooks and Lightning's per-batch logging. `counts[i]` is batch i's."""

    def __init__(self, device: torch.device | str | None = None):
        self.device, self.counts, self._open = device, [], None

    def _close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        self._open = contextlib.ExitStack()
        self.counts.append(self._open.enter_context(count_host_syncs(self.device or pl_module.device)))

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()


def size_config(size: str, image_size: int | None = None) -> dict:
    s = dict(SIZES[size])
    if "arch" in s:  # the paper's towers, read from conf/arch (what a run trains)
        from omegaconf import OmegaConf

        from blip2_train.config.compose import compose

        arch = compose("train", [f"arch={s['arch']}", "model=stage1_vitg", "paths.bert_dir=unused",
                                 f"data.image_size={image_size or 224}"]).arch
        arch = OmegaConf.to_container(arch, resolve=True)
        s.update(vision=arch["vision"], qformer=arch["qformer"], num_query_tokens=arch["num_query_tokens"])
    elif image_size:
        s["vision"] = dict(s["vision"], image_size=image_size)
    return s


def build_variant(variant: str, tok_dir: Path, s: dict, device: torch.device):
    from blip2_train.models.build_stage1 import build_stage1_model

    on_gpu = device.type == "cuda"
    model = build_stage1_model(str(tok_dir), s["vision"], s["qformer"], s["num_query_tokens"], seed=0,
                               attn_implementation="eager" if variant == "eager" else "sdpa",
                               vision_dtype="bfloat16" if on_gpu else "float32",
                               compile_qformer=variant.endswith("compile"))
    model.to(device)
    model.set_train_modes(True)
    return model


def synthetic_batch(s: dict, vocab: int, device: torch.device) -> dict:
    """Random images and captions, one of them padded (a real batch pads to its longest caption), and fixed ITM
    negatives (each image's neighbour) so every variant trains on exactly the same pairs."""
    g = torch.Generator().manual_seed(0)
    b, t, px = s["batch_size"], s["text_len"], s["vision"]["image_size"]
    ids = torch.randint(5, vocab - 1, (b, t), generator=g)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[-1, t // 2:] = 0
    ids[-1, t // 2:] = 0
    neg = (torch.arange(b) + 1) % b
    batch = dict(pixel_values=torch.randn(b, 3, px, px, generator=g), input_ids=ids, attention_mask=mask,
                 image_ids=torch.arange(b), neg_idx=(neg, neg))
    return {k: (tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device)) for k, v in batch.items()}


def train_step(model, opt, batch, autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step -> (detached losses [loss, itc, itm, lm], gradients before the update)."""
    with autocast:
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad(set_to_none=True)
    return torch.stack([out.loss.detach(), out.loss_itc, out.loss_itm, out.loss_lm]), grads


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every tensor (the same names in both)."""
    if a.keys() != b.keys():
        raise AssertionError(f"different gradients: {sorted(set(a) ^ set(b))[:5]}")
    num = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b))
    den = math.sqrt(sum(float(b[k].float().pow(2).sum()) for k in b))
    return num / max(den, 1e-30)


def run(size: str = "cpu", rounds: int = 3, steps: int = 1, device_name: str = "auto",
        image_size: int | None = None, variants: tuple[str, ...] = VARIANTS, progress=None) -> dict:
    """Time each variant (best of `rounds` interleaved rounds of `steps` steps), check its first step's losses and
    gradients against eager's, count its host syncs. Raises AssertionError where a lever changed the result."""
    from blip2_train.bench.train import synthetic_bert_tokenizer
    from blip2_train.lit.optim import build_adamw

    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    s = size_config(size, image_size)
    variants = ("eager", *[v for v in variants if v != "eager"])  # first: what every other variant is checked against
    say = progress or (lambda msg: None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as d:
        tok_dir = synthetic_bert_tokenizer(Path(d) / "tok", s["vocab_size"])
        models = {}
        for v in variants:
            say(f"building {v}")
            models[v] = build_variant(v, tok_dir, s, device)
    vocab = models["eager"].config.qformer_config.vocab_size
    batch = synthetic_batch(s, vocab, device)
    opts = {v: build_adamw(m, 1e-5) for v, m in models.items()}
    rows, ref = {}, None
    for v in variants:  # the first step (compilation happens here) and the result check against eager's
        say(f"first step of {v}")
        t0 = time.perf_counter()
        loss, grads = train_step(models[v], opts[v], batch, autocast)
        if on_gpu:
            torch.cuda.synchronize()
        rows[v] = {"first_step_s": time.perf_counter() - t0, "step_s": []}
        loss = loss.float().cpu()
        ref = ref or (loss, grads)
        rows[v]["losses"] = [float(x) for x in loss]
        rows[v]["loss_rel_diff"] = float(((loss - ref[0]).abs() / ref[0].abs().clamp_min(1e-12)).max())
        rows[v]["grad_rel_diff"] = relative_difference(grads, ref[1])
        del grads
    del ref
    for r in range(rounds):
        for v in variants:
            say(f"round {r + 1}/{rounds}: {v}")
            for _ in range(steps):
                if on_gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                train_step(models[v], opts[v], batch, autocast)
                if on_gpu:
                    torch.cuda.synchronize()
                rows[v]["step_s"].append(time.perf_counter() - t0)
    for v in variants:
        say(f"host syncs of {v}")
        with count_host_syncs(device) as c:
            train_step(models[v], opts[v], batch, autocast)
        rows[v]["host_syncs"], rows[v]["host_sync_sites"] = c.total, dict(c.by_site())
        rows[v]["best_step_s"] = min(rows[v]["step_s"])
        rows[v]["samples_per_s"] = s["batch_size"] / rows[v]["best_step_s"]
    tol = LOSS_RTOL if not on_gpu else 1e-2  # bf16 autocast: kernels round differently, 1e-2 of a loss
    gtol = GRAD_RTOL if not on_gpu else 5e-2
    bad = [f"{v}: loss differs by {rows[v]['loss_rel_diff']:.2e} (> {tol:.0e}), gradients by "
           f"{rows[v]['grad_rel_diff']:.2e} (> {gtol:.0e})" for v in variants
           if rows[v]["loss_rel_diff"] > tol or rows[v]["grad_rel_diff"] > gtol]
    import platform

    return {"size": size, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if on_gpu else
            f"CPU ({os.cpu_count()} cores, {platform.machine()})",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rounds, "steps": steps,
            "batch_size": s["batch_size"], "text_len": s["text_len"], "num_query_tokens": s["num_query_tokens"],
            "image_size": s["vision"]["image_size"], "qformer": {k: s["qformer"].get(k) for k in
                                                                 ("hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "attention_probs_dropout_prob")},
            "loss_rtol": tol, "grad_rtol": gtol, "same_result": not bad, "mismatches": bad, "variants": rows}


def markdown(r: dict, command: str) -> str:
    q = r["qformer"]
    eager = r["variants"]["eager"]["best_step_s"]
    lines = [f"## Q-Former speed levers, stage-1 step, on {r['device_name']}\n",
             f"Command: `{command}`  ",
             f"Size `{r['size']}`: Q-Former {q['hidden_size']} wide, {q['num_hidden_layers']} layers, "
             f"{q['num_attention_heads']} heads, attention dropout {q['attention_probs_dropout_prob']}; "
             f"{r['num_query_tokens']} queries, {r['text_len']} text tokens, {r['image_size']} px, batch "
             f"{r['batch_size']}; torch {r['torch']}, {r['threads']} threads. Best of {r['rounds']} interleaved "
             f"rounds of {r['steps']} steps (forward, backward, AdamW).\n",
             "| variant | step (s) | samples/s | vs eager | first step (s) | loss (ITC+ITM+LM) | loss rel. diff | "
             "grad rel. diff | host syncs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v, row in r["variants"].items():
        lines.append(f"| {v} | {row['best_step_s']:.3f} | {row['samples_per_s']:.2f} | "
                     f"{eager / row['best_step_s']:.2f}x | {row['first_step_s']:.1f} | {row['losses'][0]:.6f} | "
                     f"{row['loss_rel_diff']:.1e} | {row['grad_rel_diff']:.1e} | {row['host_syncs']} |")
    verdict = ("same losses and gradients as eager to fp32 rounding" if r["same_result"] and r["device"] == "cpu"
               else "same losses and gradients as eager within the tolerances" if r["same_result"]
               else "RESULT CHANGED: " + "; ".join(r["mismatches"]))
    lines.append(f"\nEvery variant: {verdict} (loss rtol {r['loss_rtol']:.0e}, gradient rtol {r['grad_rtol']:.0e}, "
                 "first step, same seed and batch). \"first step\" includes compilation. Host syncs: one step, "
                 "counted by `blip2_train.utils.syncs` (on CPU: the calls that would sync on an accelerator).")
    return "\n".join(lines)


def main(a, command: str) -> int:
    """`blip2-bench levers`: run, print the table, write it to the benchmarks page; 1 where a lever changed the
    result."""
    import json
    import sys

    from tqdm import tqdm

    from blip2_train.bench.doc import write_section

    bar = tqdm(total=len(VARIANTS) * (3 + a.rounds), desc="levers", unit="part", file=sys.stderr)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg)
        bar.update(1)

    try:
        r = run(a.size, a.rounds, a.steps, a.device, a.image_size, progress=progress)
    finally:
        bar.close()
    text = markdown(r, command)
    print(text)
    dev = r["device"].split(":")[0]
    name = "levers-cpu" if (dev, a.size) == ("cpu", "cpu") else f"levers-{dev}-{a.size}"
    write_section(name, text, Path(a.doc))
    if a.json:
        Path(a.json).write_text(json.dumps({"command": command, **r}, indent=1))
    best = max(r["variants"], key=lambda v: r["variants"][v]["samples_per_s"])
    print(f"\nlevers: {len(r['variants'])} variants of a stage-1 step timed on {r['device_name']}; fastest {best} "
          f"({r['variants']['eager']['best_step_s'] / r['variants'][best]['best_step_s']:.2f}x eager); "
          f"{'same result in every variant' if r['same_result'] else 'A LEVER CHANGED THE RESULT'}. "
          f"Table in {a.doc} (section {name})" + (f", figures in {a.json}" if a.json else "") +
          ". Next: the same on a GPU at the real size: blip2-bench levers --size real --device cuda "
          "(run_scripts/gpu_check.sh runs it).")
    return 0 if r["same_result"] else 1
