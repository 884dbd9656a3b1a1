"""`blip2-bench memory`: peak CPU memory of two hot-path computations, each against the naive way, at a reduced
size.

    blip2-bench memory lm-loss   # stage-2 LM loss, forward + backward, from the LLM's hidden states:
                                 #   full-logits ([B, L, V] logits, upcast by the loss) vs chunked (LM head applied
                                 #   at labelled positions only, in recomputed chunks)
    blip2-bench memory itc       # retrieval ITC similarity: all-texts (images in chunks of 1024, every text at
                                 #   once) vs blocked (blocks of at most ITC_BLOCK_BYTES)

Each variant runs in a fresh process whose allocator returns every large block to the OS at once
(MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors; the figure is the peak resident memory
(VmHWM, reset once the inputs are built) minus the resident memory at that point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024  # kB


def _reset_peak() -> float:
    """Reset the peak (Linux >= 4.0) and return the current resident memory, MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mib("VmRSS:")


def _peak_mib() -> float:
    return _status_mib("VmHWM:")


def measure(fn, *small_args) -> float:
    """Peak MiB above the current resident memory while `fn()` runs, after one warm-up call of
    `fn(*small_args)` (the first call of a kernel loads code and buffers once per process)."""
    fn(*small_args)
    base = _reset_peak()
    fn()
    return _peak_mib() - base


def lm_loss_variant(variant: str, a) -> float:
    from blip2_train.models import losses

    torch.manual_seed(0)
    dt = getattr(torch, a.dtype)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False).to(dt).requires_grad_(False)
    hidden = torch.randn(a.batch, a.seq, a.hidden, dtype=dt, requires_grad=True)
    labels = torch.full((a.batch, a.seq), -100)
    start = a.queries + 4  # image tokens, bos and a short prompt carry no label
    labels[:, start : start + a.labelled] = torch.randint(0, a.vocab, (a.batch, a.labelled))

    def step(rows=a.batch):
        h = hidden[:rows].detach().requires_grad_(True)
        if variant == "full-logits":  # full [B, L, V] logits in the LLM dtype, upcast by the loss
            loss = losses.lm_loss(head(h), labels[:rows], label_smoothing=0.0)
        else:
            loss = losses.lm_loss_from_hidden(h, labels[:rows], head, a.vocab, chunk_bytes=a.chunk_mib * 2**20)
        loss.backward()

    return measure(step, 1)


def itc_variant(variant: str, a) -> float:
    from blip2_train.eval.metrics import retrieval

    torch.manual_seed(0)
    feats = F.normalize(torch.randn(a.images, a.queries, a.dim), dim=-1)
    text = F.normalize(torch.randn(a.texts, a.dim), dim=-1)
    retrieval.ITC_BLOCK_BYTES = a.block_mib * 2**20

    def sim(images=a.images):
        if variant == "all-texts":  # images in chunks of 1024, every text at once
            torch.cat([torch.einsum("iqd,td->iqt", feats[i : min(i + 1024, images)], text).amax(dim=1)
                       for i in range(0, images, 1024)])
        else:
            retrieval.itc_similarity(feats[:images], text)

    return measure(sim, 1)


# the naive way first, then ours
VARIANTS = {"lm-loss": ("full-logits", "chunked"), "itc": ("all-texts", "blocked")}


def variant_peak(a) -> float:
    """One variant in this process (the child `run` starts): its peak MiB."""
    return (lm_loss_variant if a.what == "lm-loss" else itc_variant)(a.variant, a)


def run(a, args: list[str]) -> dict:
    """Each variant of `a.what` in a fresh `blip2-bench memory ... --variant V` process: their peaks, MiB."""
    res = {}
    for v in VARIANTS[a.what]:
        out = subprocess.run([sys.executable, "-m", "blip2_train.cli.bench", "memory", *args, "--variant", v],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    return {"what": a.what, **{f"{k}_peak_mib": round(v, 1) for k, v in res.items()},
            "args": {k: v for k, v in vars(a).items() if k != "command"}}
