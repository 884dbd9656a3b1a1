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


class _FetchRows(torch.autograd.Function):
    """Rows `idx` of the rank-order concatenation of every rank's `t`, moving only those rows (all_to_all).

    Forward: each rank publishes the indices it wants (a few ints), then every rank sends the requested rows
    of its own `t` to the requester. Backward (only when `t` requires grad, e.g. an unfrozen ViT): the row
    gradients travel back the same way and are summed into the owner's rows, so every rank's rows receive
    the gradient of every use, exactly as a gather-with-grad would give.
    """

    @staticmethod
    def forward(ctx, t, idx):
        world, me, b = dist.get_world_size(), dist.get_rank(), t.shape[0]
        # [W, 1 + M]: every rank's batch size (global indices assume equal ones) and the M rows it requests
        table = gather_no_grad(torch.cat([idx.new_tensor([b]), idx])).view(world, -1)
        if (table[:, 0] != b).any():
            raise ValueError(f"fetch_rows needs the same batch size on every rank, got {table[:, 0].tolist()}")
        wanted = table[:, 1:]
        # rows of mine that each rank wants: row-major selection groups them by requester, in its order
        mine = wanted // b == me
        send_idx = wanted[mine] - me * b
        owner = idx // b
        order = torch.argsort(owner, stable=True)  # my requests grouped by owner, as they arrive
        send_splits = mine.sum(dim=1).tolist()  # one host sync for all ranks' counts
        recv_splits = torch.bincount(owner, minlength=world).tolist()
        recv = t.new_empty((idx.shape[0], *t.shape[1:]))
        dist.all_to_all_single(recv, t[send_idx].contiguous(), recv_splits, send_splits)
        out = torch.empty_like(recv)
        out[order] = recv
        ctx.save_for_backward(send_idx, order)
        ctx.splits, ctx.rows = (send_splits, recv_splits), b
        return out

    @staticmethod
    def backward(ctx, grad):
        send_idx, order = ctx.saved_tensors
        send_splits, recv_splits = ctx.splits
        back = grad.new_empty((send_idx.shape[0], *grad.shape[1:]))
        dist.all_to_all_single(back, grad[order].contiguous(), send_splits, recv_splits)
        g = grad.new_zeros((ctx.rows, *grad.shape[1:]))
        return g.index_add_(0, send_idx, back), None


def fetch_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`cat(t of every rank)[idx]` without the concatenation: [M, ...] for M indices into the global batch
    (every rank passes the same M and the same t.shape). Per rank it moves M rows, not (W - 1) * B rows:
    the ITM negatives need one image per text, not every rank's images. Differentiable in `t`."""
    if not is_dist():
        return t[idx]
    return _FetchRows.apply(t, idx)


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
