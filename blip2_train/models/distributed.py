"""All-gathers for the contrastive and matching losses; identities on one process / no process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


@torch.no_grad()
def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` of every rank along dim 0, without gradient (the ITC targets' side)."""
    if not is_dist():
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        # Every rank used every rank's slice: sum the gradients of all ranks, keep our own slice.
        g = torch.stack(grads)
        dist.all_reduce(g)
        return g[dist.get_rank()]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 keeping the gradient path to every rank's slice (ITM hard-negative images)."""
    if not is_dist():
        return t
    return torch.cat(_GatherWithGrad.apply(t), dim=0)


def gather_padded(t: torch.Tensor, pad_value: int = 0) -> tuple[torch.Tensor, int]:
    """Gather [B, T_rank] token tensors whose T differs per rank: right-pad to the largest T first.

    Returns the gathered tensor and that common length, to which local tensors must be padded too.
    """
    if not is_dist():
        return t, t.shape[1]
    length = torch.tensor([t.shape[1]], device=t.device)
    lengths = gather_no_grad(length)
    max_len = int(lengths.max())
    return gather_no_grad(pad_to(t, max_len, pad_value)), max_len


def pad_to(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    return t if t.shape[1] == length else F.pad(t, (0, length - t.shape[1]), value=value)


def shard_range(n: int, rank_: int, world: int) -> tuple[int, int]:
    """Contiguous share [lo, hi) of n items for a rank; gather_varlen restores the order of such shares."""
    per = -(-n // world)
    return min(n, rank_ * per), min(n, (rank_ + 1) * per)


def gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose dim 0 differs per rank (uneven shards), in rank order."""
    if not is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = gather_no_grad(n).tolist()
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    full = gather_no_grad(padded)
    return torch.cat([full[r * max(sizes) : r * max(sizes) + s] for r, s in enumerate(sizes)])
