"""The three stage-1 losses as functions of tensors, and the ITM hard-negative sampler.

Each follows the reference computation (docs/reference.md); the distributed parts go through
`blip2_train.distributed.collectives` and reduce to the one-process computation when there is no process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blip2_train.distributed.collectives import gather_no_grad, rank

MASKED = -10000.0  # the reference's fill value for positives before the hard-negative softmax
# Which pairs of a batch count as positives (ITC targets, never drawn as ITM hard negatives), `false_negatives`:
# - "reference": LAVIS (blip2_qformer.py): the same index, or the same image_id when samples carry it;
# - "caption": also every pair whose caption text is identical (same token ids): an identical caption of another
#   image describes this image too (duplicate images, or generic captions), so it is no true negative.
FALSE_NEGATIVES = ("reference", "caption")
# fp32 logits per chunk of the chunked LM loss; its peak is about 3x this (fp32 logits, log-softmax, gradient)
LOGITS_CHUNK_BYTES = 64 * 2**20


@dataclass
class ITCResult:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # [B, G] local images vs all gathered texts, divided by temp
    sim_t2i: torch.Tensor  # [B, G] local texts vs all gathered images, divided by temp
    pos_mask: torch.Tensor  # [B, G] bool: positives (same index, or same image_id)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_targets(pos_mask: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(1 - eps) * pos / pos.sum + eps / G: with one positive per row this IS cross-entropy with label smoothing."""
    pos = pos_mask.float()
    return (1.0 - label_smoothing) * pos / pos.sum(dim=1, keepdim=True) + label_smoothing / pos.shape[1]


def itc_loss(
    image_feats: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    label_smoothing: float = 0.1,
    extra_pos: torch.Tensor | None = None,
) -> ITCResult:
    """Image-text contrastive loss.

    image_feats: [B, Q, D] L2-normalised projected query outputs; text_feat: [B, D] normalised CLS projection.
    Similarity = max over the Q queries of the dot product, / temp. Features of all ranks are gathered WITHOUT
    gradient; the gradient flows through the local rows, as in the reference. `extra_pos` [B, G] bool: further
    positives beyond the reference's (index / image_id), e.g. `same_text_mask` (see FALSE_NEGATIVES).
    """
    b = image_feats.shape[0]
    image_feats_all = gather_no_grad(image_feats)  # [G, Q, D]
    text_feat_all = gather_no_grad(text_feat)  # [G, D]
    sim_i2t = torch.einsum("bqd,gd->bqg", image_feats, text_feat_all).amax(dim=1) / temp
    sim_t2i = torch.einsum("bd,gqd->bgq", text_feat, image_feats_all).amax(dim=2) / temp
    g = sim_i2t.shape[1]
    if image_ids is None:
        pos_mask = torch.zeros(b, g, dtype=torch.bool, device=image_feats.device)
        offset = rank() * b
        pos_mask[torch.arange(b), offset + torch.arange(b)] = True
    else:
        ids_all = gather_no_grad(image_ids)
        pos_mask = image_ids.view(-1, 1) == ids_all.view(1, -1)
    if extra_pos is not None:
        pos_mask = pos_mask | extra_pos
    targets = itc_targets(pos_mask, label_smoothing)
    loss = (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2
    return ITCResult(loss, sim_i2t, sim_t2i, pos_mask)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, pos_mask: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One negative image per local text and one negative text per local image, from the GLOBAL batch.

    Drawn from softmax(similarity) with the positives masked to -10000, so harder negatives are likelier.
    Returns (neg_image_idx [B], neg_text_idx [B]), indices into the gathered batch.
    """
    def weights(sim):
        w = F.softmax(sim.float().masked_fill(pos_mask, MASKED), dim=1)
        # Non-finite similarities (a diverging step, fp16 overflow) must not crash the sampler: such rows
        # draw uniformly among the non-positives; the non-finite loss then skips the step anyway.
        bad = ~torch.isfinite(w).all(dim=1, keepdim=True)
        uniform = (~pos_mask).float()
        return torch.where(bad, uniform / uniform.sum(1, keepdim=True).clamp_min(1), w)

    w_t2i, w_i2t = weights(sim_t2i), weights(sim_i2t)
    neg_image_idx = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_text_idx = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image_idx, neg_text_idx


@torch.no_grad()
def same_text_mask(ids_local: torch.Tensor, ids_all: torch.Tensor) -> torch.Tensor:
    """[B, G] bool: local caption b and gathered caption g are the same text (token ids right-padded to one
    length). Symmetric in meaning: image b matches text g, and text b matches image g."""
    return (ids_local[:, None, :] == ids_all[None, :, :]).all(dim=-1)


def itm_labels(batch_size: int, device=None) -> torch.Tensor:
    """Pairs are ordered (positive, negative image, negative text): labels [1]*B + [0]*2B."""
    return torch.cat([torch.ones(batch_size, dtype=torch.long, device=device),
                      torch.zeros(2 * batch_size, dtype=torch.long, device=device)])


def itm_loss(itm_logits: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy on the 3B pair logits [3B, 2] (already averaged over the queries)."""
    b = itm_logits.shape[0] // 3
    return F.cross_entropy(itm_logits, itm_labels(b, itm_logits.device))


def lm_labels(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    return input_ids.masked_fill(input_ids == pad_token_id, -100)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy over text positions: logits[:, t] predicts labels[:, t + 1]; -100 ignored.

    The Q-Former's LM loss (smoothing 0.1, as the reference) and a decoder-only LLM's (no smoothing).
    """
    return token_ce(logits[:, :-1], labels[:, 1:], label_smoothing)


def padding_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] of 1 (token) / 0 (padding) -> additive [B, 1, 1, T] (0 / finfo.min) over the keys, as a Q-Former's
    bidirectional pass needs. transformers takes a 4D mask as it is; a 2D one it first checks for padding
    (`mask.all()`, to drop a mask that masks nothing), a host sync in every Q-Former call of the step."""
    return torch.zeros(mask.shape[0], 1, 1, mask.shape[1], dtype=dtype, device=mask.device).masked_fill_(
        ~mask.bool()[:, None, None, :], torch.finfo(dtype).min)


def lm_attention_mask(num_queries: int, text_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, Q+T, Q+T] mask for the image-grounded generation pass.

    Queries see queries only (not the text); text sees every query and the text before it (causal), never
    padding. Additive (0 / finfo.min) because eager attention ADDS the mask: a boolean mask would be wrong.
    """
    b, t = text_mask.shape
    n = num_queries + t
    dev = text_mask.device
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
    allowed[:, :num_queries, :num_queries] = True
    allowed[:, num_queries:, :num_queries] = True
    allowed[:, num_queries:, num_queries:] = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev))
    allowed[:, :, num_queries:] &= text_mask.bool()[:, None, :]
    # Padding rows must still see something (queries) or softmax gives NaN; their outputs are ignored.
    mask = torch.zeros(b, 1, n, n, dtype=dtype, device=dev)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def token_ce(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of aligned logits [B, T, V] and labels [B, T] (-100 = ignored), computed in fp32.

    Encoder-decoder targets use it as is; `lm_loss` shifts first.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)


def lm_loss_from_hidden(hidden: torch.Tensor, labels: torch.Tensor, head, vocab_size: int,
                        chunk_bytes: int = LOGITS_CHUNK_BYTES, label_smoothing: float = 0.0) -> torch.Tensor:
    """`lm_loss(head(hidden), labels)` without the [B, L, V] logits: the head runs only where a (shifted) label
    exists, in chunks of at most `chunk_bytes` of fp32 logits, each recomputed in backward (activation
    checkpointing) so that only the hidden rows are kept. hidden: [B, L, H]; labels: [B, L] (-100 = ignored).

    Stage 2 puts Q image positions and the prompt before the caption: the full logits (2 GB at B=64 with a
    128k vocabulary, plus their fp32 copy) are mostly positions that carry no label.
    """
    # the labelled positions, read once (the host must know how many); index_select's backward is a scatter-add,
    # where a boolean mask's would read the mask again
    b, t = (labels[:, 1:] != -100).nonzero().unbind(1)
    at = b * labels.shape[1] + t  # row of the flattened [B * L] positions whose label is at t + 1
    rows = hidden.flatten(0, 1).index_select(0, at)  # [M, H]
    targets = labels.flatten().index_select(0, at + 1)  # [M]
    if rows.shape[0] == 0:  # no label at all: NaN, as F.cross_entropy's mean (the step is then skipped)
        return hidden.sum() * float("nan")
    step = max(1, chunk_bytes // (4 * vocab_size))

    def chunk_ce_sum(h, t):
        return F.cross_entropy(head(h).float(), t, reduction="sum", label_smoothing=label_smoothing)

    total = sum(checkpoint(chunk_ce_sum, rows[i : i + step], targets[i : i + step], use_reentrant=False)
                for i in range(0, rows.shape[0], step))
    return total / rows.shape[0]  # the mean over labelled positions
