"""A pool of recent samples: further ITM hard-negative candidates beyond the global batch.

The reference draws each ITM hard negative from its global batch, 1,600 pairs (16 GPUs x 100). Among that many,
an image's hardest other captions are near-misses: its objects with one colour changed, or moved. From a batch of
32 (one small GPU, a laptop) they seldom are, and ITM never learns to tell them apart: ranking ITC's top-k, it
then scores such near-misses almost as high as the true caption. The pool keeps the last `size` samples of this
rank (frozen-tower image tokens before ln_vision, caption ids, image_id, and their ITC features), so a small batch
draws its negatives from batch + pool, as a large one would. The ITC loss is unchanged (batch only).

The pool's ITC features are those computed when the sample passed (stale by up to size / batch steps): they only
weight the draw, as MoCo's queue does; the ITM pass of a drawn negative is computed with the current weights, on
its stored tokens (exact while the tower is frozen; an unfrozen tower's stored tokens are as stale as the
features). Not checkpointed: after a resume it refills within size / batch steps.
Memory per rank at real size (ViT-g, 257 x 1408 tokens in bf16): 0.72 MB a sample, 0.74 GB for 1024.
"""

from __future__ import annotations

import torch

from blip2_train.models.distributed import pad_to


class NegativePool:
    """Ring buffer of the last `size` local samples; empty (and inert) until the first `push`."""

    def __init__(self, size: int, pad_token_id: int = 0):
        if size < 0:
            raise ValueError(f"negative pool size must be >= 0, got {size}")
        self.size, self.pad_token_id = size, pad_token_id
        self.count, self.next = 0, 0
        self.tokens = self.ids = self.mask = self.image_ids = self.image_feats = self.text_feat = None

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        self.count, self.next = 0, 0

    @property
    def width(self) -> int:
        """Token length of the stored captions (right-padded to the longest pushed)."""
        return 0 if self.ids is None else self.ids.shape[1]

    def view(self) -> dict[str, torch.Tensor]:
        """The filled slots (any order: slot order carries no meaning)."""
        n = self.count
        return {"tokens": self.tokens[:n], "ids": self.ids[:n], "mask": self.mask[:n],
                "image_ids": self.image_ids[:n], "image_feats": self.image_feats[:n], "text_feat": self.text_feat[:n]}

    @torch.no_grad()
    def push(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_ids: torch.Tensor,
             image_feats: torch.Tensor, text_feat: torch.Tensor) -> None:
        """Store a batch (the oldest slots are overwritten first). tokens: [B, N, Dv] before ln_vision."""
        if self.size == 0:
            return
        # a diverging step's (its loss is skipped) non-finite features would weight every draw for size / B steps
        finite = torch.isfinite(image_feats).flatten(1).all(1) & torch.isfinite(text_feat).flatten(1).all(1)
        if not bool(finite.all()):
            tokens, ids, mask, image_ids = tokens[finite], ids[finite], mask[finite], image_ids[finite]
            image_feats, text_feat = image_feats[finite], text_feat[finite]
        b = tokens.shape[0]
        if b == 0:
            return
        if self.tokens is None:
            self.tokens = tokens.new_empty((self.size, *tokens.shape[1:]))
            self.ids = ids.new_full((self.size, ids.shape[1]), self.pad_token_id)
            self.mask = mask.new_zeros((self.size, mask.shape[1]))
            self.image_ids = image_ids.new_empty((self.size,))
            self.image_feats = image_feats.new_empty((self.size, *image_feats.shape[1:]))
            self.text_feat = text_feat.new_empty((self.size, *text_feat.shape[1:]))
        width = max(self.width, ids.shape[1])
        self.ids, self.mask = pad_to(self.ids, width, self.pad_token_id), pad_to(self.mask, width, 0)
        ids, mask = pad_to(ids, width, self.pad_token_id), pad_to(mask, width, 0)
        # the last `size` of the batch if it is larger than the pool
        keep = slice(max(0, b - self.size), b)
        slots = (self.next + torch.arange(keep.stop - keep.start, device=tokens.device)) % self.size
        for store, value in ((self.tokens, tokens), (self.ids, ids), (self.mask, mask), (self.image_ids, image_ids),
                             (self.image_feats, image_feats), (self.text_feat, text_feat)):
            store[slots] = value[keep].detach().to(store.dtype)
        self.next = int((self.next + slots.numel()) % self.size)
        self.count = min(self.size, self.count + slots.numel())
