"""Run by test_ddp.py in 2 gloo processes: one stage-1 step under DDP with fixed ITM negatives that cross
ranks, by the fetch path (each rank fetches only its negative rows) and by the gather-all path (every rank's fp32
ln_vision output gathered WITH gradient).

Saves both DDP-averaged gradients, the loss, and the bytes each collective moved (a pass-through counter
around torch.distributed: every call still runs for real)."""

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package
from blip2_train.models import vision  # noqa: E402
from blip2_train.models.stage1 import Blip2Stage1  # noqa: E402
from helpers.tiny import batch_of, tiny_stage1  # noqa: E402
from blip2_train.models.tokenizer import load_qformer_tokenizer

CAPTIONS = ["a red circle in the top left", "a green triangle", "there is a blue square at the bottom right"]
B = 3
# global indices (rank r holds rows r*B .. r*B+2); each rank takes negatives from both ranks
NEG_IMAGE = [[4, 0, 5], [1, 2, 3]]
NEG_TEXT = [[3, 5, 1], [0, 4, 2]]


class _GatherWithGrad(torch.autograd.Function):
    """The gather-all path: all-gather forward, all-reduce of the stacked gradients backward."""

    @staticmethod
    def forward(ctx, t):
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_all_negative_image_embeds(self, tokens, neg_image_idx):
    image_embeds = vision.ln_vision(self.hf.vision_model, tokens)
    return torch.cat(_GatherWithGrad.apply(image_embeds), dim=0)[neg_image_idx]


def inputs(tokenizer, rank):
    """Rank r's slice: distinct images; the same captions in another order (equal LM token counts per rank)."""
    captions = CAPTIONS[rank:] + CAPTIONS[:rank]
    return batch_of(tokenizer, captions, seed=10 + rank)


def counting(name, fn, moved):
    def wrapper(*args, **kw):
        tensors = args[0] if isinstance(args[0], list) else [args[0]]  # the output buffer(s)
        moved[name] += sum(t.numel() * t.element_size() for t in tensors)
        return fn(*args, **kw)
    return wrapper


def step(tok_dir, frozen, rank, moved):
    model = tiny_stage1(tok_dir, seed=5, freeze_vision=frozen, vision_dtype="bfloat16" if frozen else "float32")
    model.set_train_modes(True)
    ddp = DistributedDataParallel(model)
    pixels, ids, mask = inputs(load_qformer_tokenizer(tok_dir), rank)
    moved.clear()  # DDP's start-up broadcast is not part of a step
    out = ddp(pixels, ids, mask, neg_idx=(torch.tensor(NEG_IMAGE[rank]), torch.tensor(NEG_TEXT[rank])))
    forward_moved = dict(moved)
    out.loss.backward()  # DDP averages the gradients here (in C++: not counted)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.detach(), "grads": grads, "forward_moved": forward_moved, "moved": dict(moved)}


def main(tok_dir: str, out_path: str, freeze: str) -> None:
    dist.init_process_group("gloo")
    moved = Counter()
    for name in ("all_gather", "all_reduce", "all_to_all_single"):
        setattr(dist, name, counting(name, getattr(dist, name), moved))
    frozen, rank = freeze == "frozen", dist.get_rank()
    res = {"fetch": step(tok_dir, frozen, rank, moved)}
    Blip2Stage1.negative_image_embeds = gather_all_negative_image_embeds
    res["gather_all"] = step(tok_dir, frozen, rank, moved)
    torch.save(res, f"{out_path}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
