"""Peak CPU memory of the two hot-path computations of issue #16 (item 5), former way vs now, at a reduced size.

    python -m blip2_train.bench_memory lm-loss   # stage-2 LM loss, forward + backward, from the LLM's hidden states
    python -m blip2_train.bench_memory itc       # retrieval ITC similarity matrix

Each variant runs in a fresh process whose allocator returns every large block to the OS at once
(MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors; the figure is the peak resident memory
(VmHWM, reset once the inputs are built) minus the resident memory at that point.
"""

from __future__ import annotations

import argparse
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
        if variant == "former":  # full [B, L, V] logits in the LLM dtype, upcast by the loss
            loss = losses.lm_loss(head(h), labels[:rows], label_smoothing=0.0)
        else:
            loss = losses.lm_loss_from_hidden(h, labels[:rows], head, a.vocab, chunk_bytes=a.chunk_mib * 2**20)
        loss.backward()

    return measure(step, 1)


def itc_variant(variant: str, a) -> float:
    from blip2_train.eval import retrieval

    torch.manual_seed(0)
    feats = F.normalize(torch.randn(a.images, a.queries, a.dim), dim=-1)
    text = F.normalize(torch.randn(a.texts, a.dim), dim=-1)
    retrieval.ITC_BLOCK_BYTES = a.block_mib * 2**20

    def sim(images=a.images):
        if variant == "former":  # images in chunks of 1024, every text at once
            torch.cat([torch.einsum("iqd,td->iqt", feats[i : min(i + 1024, images)], text).amax(dim=1)
                       for i in range(0, images, 1024)])
        else:
            retrieval.itc_similarity(feats[:images], text)

    return measure(sim, 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["lm-loss", "itc"])
    p.add_argument("--variant", choices=["former", "now"], help="run one variant in this process (internal)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64, help="Q + T positions")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--labelled", type=int, default=20, help="caption tokens with a label, per row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=50272)
    p.add_argument("--dtype", default="bfloat16", help="the LLM's dtype (its head and hidden states)")
    p.add_argument("--chunk-mib", type=int, default=64)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--texts", type=int, default=5000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--block-mib", type=int, default=32, help="stands for 256 at the real size")
    a = p.parse_args(argv)
    if a.variant:
        fn = lm_loss_variant if a.what == "lm-loss" else itc_variant
        print(json.dumps({"peak_mib": fn(a.variant, a)}))
        return
    args = sys.argv[1:] if argv is None else list(argv)
    res = {}
    for v in ("former", "now"):
        out = subprocess.run([sys.executable, "-m", "blip2_train.bench_memory", *args, "--variant", v],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
        res[v] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    print(json.dumps({"what": a.what, **{f"{k}_peak_mib": round(v, 1) for k, v in res.items()}, "args": vars(a)}))


if __name__ == "__main__":
    main()
