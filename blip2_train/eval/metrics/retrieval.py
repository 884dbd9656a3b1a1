"""Image-text retrieval evaluation: the reference protocol, computed faster.

Protocol (LAVIS `compute_sim_matrix` + `_report_metrics`): ITC similarity = max over queries of cosine (no
temperature). For every image row and every text column keep the top `k_test` candidates by ITC and score
them ITM(match logit) + ITC; all others count as -100. Image->text rank = best rank of the image's captions.

The candidates' score (`RERANK_SCORES`, `eval.rerank_score`):
- "reference": the ITM match logit + the ITC cosine, LAVIS's sum (comparable with published numbers). The two
  are on unrelated scales: a raw logit spans units where the top candidates' cosines differ by hundredths, so
  ITM alone decides and ITC only breaks its ties.
- "product": log p_ITM(match) + ITC cosine / temperature, the log of the product of the two heads'
  probabilities (ITC's softmax over one row is cosine / temperature up to a constant of that row). Each head
  scores on the scale it was trained on: ITM vetoes what it rejects, and among the pairs it accepts, ITC
  keeps its say.

Faster than the reference:
- Each (image, text) pair is ITM-scored once even when it is a candidate of both directions, and pairs are
  scored in large batches, not one image at a time.
- Image tokens stay on the rank that encoded them; each rank scores the pairs of its own images, so no rank
  ever holds all image tokens (the reference keeps them all, in fp32, on every rank).
- Ranks are read from the [N, k_test] candidate scores: no dense N_img x N_txt score matrix is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

RERANK_SCORES = ("reference", "product")
# Below every candidate's ITM + ITC score: non-candidates keep their ITC order there (the reference: a flat -100).
TAIL = -1.0e4
ITC_BLOCK_BYTES = 256 * 2**20  # the largest [images, Q, texts] fp32 block `itc_similarity` builds


@dataclass
class Candidates:
    """Top-k candidates per row: `index[r, c]` is a column, `score[r, c]` its final (ITM + ITC) score."""

    index: torch.Tensor  # [R, k] long
    itc: torch.Tensor  # [R, k]
    score: torch.Tensor | None = None


def itc_similarity(image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
    """[N_img, Q, D] x [N_txt, D] -> [N_img, N_txt]: max over queries of the (normalised) dot product.

    Computed in [images, Q, texts] fp32 blocks of at most `ITC_BLOCK_BYTES`, chunked over texts as well as
    images: for COCO 5k (25k captions) a block of 1024 images would hold 3.3 GB.
    """
    n_img, q = image_feats.shape[:2]
    n_txt = text_feat.shape[0]
    per_pair = q * 4  # fp32 bytes of one (image, text) column of the block
    texts_per_block = max(1, min(n_txt, ITC_BLOCK_BYTES // per_pair))
    images_per_block = max(1, ITC_BLOCK_BYTES // (per_pair * texts_per_block))
    sim = torch.empty(n_img, n_txt, dtype=torch.float32, device=image_feats.device)
    text_feat = text_feat.float()
    for i in range(0, n_img, images_per_block):
        img = image_feats[i : i + images_per_block].float()
        for j in range(0, n_txt, texts_per_block):
            # one expression: a named block would stay alive while the next one is built (2x the budget)
            sim[i : i + images_per_block, j : j + texts_per_block] = torch.einsum(
                "iqd,td->iqt", img, text_feat[j : j + texts_per_block]).amax(dim=1)
    return sim


def topk_candidates(sim: torch.Tensor, k: int) -> tuple[Candidates, Candidates]:
    """Candidates of every image row (texts) and every text column (images)."""
    k_i2t, k_t2i = min(k, sim.shape[1]), min(k, sim.shape[0])
    i, v = topk_smaller_index_first(sim, k_i2t)
    it, vt = topk_smaller_index_first(sim.t(), k_t2i)
    return Candidates(i, v), Candidates(it, vt)


def topk_smaller_index_first(sim: torch.Tensor, k: int, rows_per_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [R, k], their values) of each row's k largest values; of the values tied at the k-th, the
    smaller columns: the rule every rank of this module breaks ties by. `torch.topk` picks among ties in an
    unspecified order, so which of several identical captions became a candidate could depend on the device.
    Columns come in ascending order (the candidates' order carries no meaning). Rows in chunks: the masks are
    [chunk, N] (int64 for the running count of ties)."""
    cols, vals = [], []
    for lo in range(0, sim.shape[0], rows_per_chunk):
        s = sim[lo : lo + rows_per_chunk]
        v, i = s.topk(k, dim=1)
        kth = v[:, -1:]
        above, tied = s > kth, s == kth
        keep = above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
        if bool((keep.sum(dim=1) == k).all()):  # not so where a row holds NaN (a diverged model): topk's pick
            i = keep.nonzero()[:, 1].view(-1, k)
            v = s.gather(1, i)
        cols.append(i)
        vals.append(v)
    return torch.cat(cols), torch.cat(vals)


def unique_pairs(i2t: Candidates, t2i: Candidates) -> torch.Tensor:
    """All (image, text) pairs to ITM-score, each once, sorted by image: [P, 2]."""
    n_img = i2t.index.shape[0]
    img_of_i2t = torch.arange(n_img).unsqueeze(1).expand_as(i2t.index)
    txt_of_t2i = torch.arange(t2i.index.shape[0]).unsqueeze(1).expand_as(t2i.index)
    pairs = torch.cat([torch.stack([img_of_i2t.reshape(-1), i2t.index.reshape(-1)], 1),
                       torch.stack([t2i.index.reshape(-1), txt_of_t2i.reshape(-1)], 1)])
    return torch.unique(pairs, dim=0)  # sorted lexicographically: by image, then text


def rerank_terms(itm_logits: torch.Tensor, rule: str, temp: float | None) -> tuple[torch.Tensor, float]:
    """ITM logits [P, 2] (no match, match) -> (the ITM term of each pair's score [P], the divisor of its ITC
    cosine), for the score `rule` (RERANK_SCORES). "product" needs the model's ITC temperature."""
    if rule == "reference":
        return itm_logits[:, 1].float(), 1.0
    if rule == "product":
        if temp is None or not temp > 0:
            raise ValueError(f"rerank score 'product' needs the ITC temperature (> 0), got {temp!r}")
        return itm_logits.float().log_softmax(dim=-1)[:, 1], float(temp)
    raise ValueError(f"unknown rerank score {rule!r}; expected one of {list(RERANK_SCORES)}")


def fill_scores(i2t: Candidates, t2i: Candidates, pairs: torch.Tensor, itm: torch.Tensor, n_txt: int,
                itc_temp: float = 1.0) -> None:
    """Scatter the pair ITM terms back to both candidate tables: score = ITM + ITC / itc_temp (fp32)."""
    key = pairs[:, 0] * n_txt + pairs[:, 1]
    order = torch.argsort(key)
    key, itm = key[order], itm[order]

    def lookup(img, txt):
        pos = torch.searchsorted(key, img * n_txt + txt)
        return itm[pos]

    img_rows = torch.arange(i2t.index.shape[0]).unsqueeze(1).expand_as(i2t.index)
    i2t.score = lookup(img_rows, i2t.index).float() + i2t.itc.float() / itc_temp
    txt_rows = torch.arange(t2i.index.shape[0]).unsqueeze(1).expand_as(t2i.index)
    t2i.score = lookup(t2i.index, txt_rows).float() + t2i.itc.float() / itc_temp


def candidate_rank(c: Candidates, row: int, targets: list[int], itc_row: torch.Tensor) -> int:
    """Best rank of any target column in this row, exact for every K.

    Candidates come first, in the order of their final (ITM + ITC) score; every other column follows in the
    order of its ITC similarity (`itc_row`), which is what ranked it outside the top k. So a target that is not
    a candidate has rank k + (non-candidates with a higher ITC), never an invented rank k: with k_test=1, R@5
    is still the true R@5. (The reference scores non-candidates -100 and leaves their order to its sort.)

    Ties are broken by the smaller column index (a stable descending sort), on any number of ranks and batch
    sizes: exact ties are common (the same caption text on several images).
    """
    best = None
    scores, index = c.score[row], c.index[row]
    outside = None
    for t in targets:
        hit = (index == t).nonzero()
        if hit.numel():
            s = scores[hit[0, 0]]
            r = int((scores > s).sum() + ((scores == s) & (index < t)).sum())
        else:
            if outside is None:
                outside = torch.ones_like(itc_row, dtype=torch.bool)
                outside[index] = False
            s = itc_row[t]
            ahead = (itc_row > s) | ((itc_row == s) & (torch.arange(itc_row.numel()) < t))
            r = index.numel() + int((outside & ahead).sum())
        best = r if best is None else min(best, r)
    return best


def ranks_from_candidates(i2t: Candidates, t2i: Candidates, txt2img: list[int], img2txt: list[list[int]],
                          sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of the true texts of every image and of the true image of every text; `sim` is the ITC
    matrix [N_img, N_txt] that ranks what lies beyond the candidates."""
    sim_t = sim.t().contiguous()
    ranks_i2t = torch.tensor([candidate_rank(i2t, i, img2txt[i], sim[i]) for i in range(len(img2txt))])
    ranks_t2i = torch.tensor([candidate_rank(t2i, j, [txt2img[j]], sim_t[j]) for j in range(len(txt2img))])
    return ranks_i2t, ranks_t2i


def recall_metrics(ranks_i2t: torch.Tensor, ranks_t2i: torch.Tensor) -> dict[str, float]:
    """Percentages, named as the reference: txt_r* = image->text, img_r* = text->image."""
    m = {}
    for k in (1, 5, 10):
        m[f"txt_r{k}"] = 100.0 * (ranks_i2t < k).float().mean().item()
        m[f"img_r{k}"] = 100.0 * (ranks_t2i < k).float().mean().item()
    m["txt_r_mean"] = (m["txt_r1"] + m["txt_r5"] + m["txt_r10"]) / 3
    m["img_r_mean"] = (m["img_r1"] + m["img_r5"] + m["img_r10"]) / 3
    m["r_mean"] = (m["txt_r_mean"] + m["img_r_mean"]) / 2
    return m


def itc_ranks(sim: torch.Tensor, txt2img: list[int], img2txt: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks by the ITC matrix [N_img, N_txt] alone (no ITM re-ranking), vectorised (no sort): the
    columns scoring higher than the true one (an image: its best caption), plus those scoring the same with a
    smaller index. That is the tie rule of `candidate_rank` and `ranks_from_dense`: ITC alone and re-ranked are
    compared under one rule. Ties are exact wherever captions repeat: an identical caption of another image has
    the same ITC, and counting the tie a hit for ITC alone only would charge re-ranking for it."""
    n_img, n_txt = sim.shape
    rows, cols = torch.arange(n_img), torch.arange(n_txt)
    true_img = torch.tensor(txt2img, dtype=torch.long)
    true_t2i = sim[true_img, cols]  # [N_txt]
    ranks_t2i = (sim > true_t2i[None, :]).sum(dim=0) + ((sim == true_t2i[None, :]) & (rows[:, None] < true_img)).sum(dim=0)
    owner = torch.full((n_txt,), -1, dtype=torch.long)
    for i, texts in enumerate(img2txt):
        owner[torch.tensor(texts, dtype=torch.long)] = i
    mine = owner[None, :] == rows[:, None]  # [N_img, N_txt]: the image's own captions
    true_i2t = sim.masked_fill(~mine, float("-inf")).amax(dim=1)  # [N_img]: its best caption's ITC
    at_best = sim == true_i2t[:, None]
    first = torch.where(mine & at_best, cols[None, :], n_txt).amin(dim=1)  # the smallest own column at that ITC
    ranks_i2t = (sim > true_i2t[:, None]).sum(dim=1) + (at_best & (cols[None, :] < first[:, None])).sum(dim=1)
    return ranks_i2t, ranks_t2i


def rerank(sim: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor], torch.Tensor],
           itc_temp: float = 1.0) -> tuple[Candidates, Candidates]:
    """Top-k selection + one batched ITM call over the unique pairs (`score_pairs([P,2]) -> [P]`, each pair's ITM
    term), scored ITM + ITC / itc_temp."""
    i2t, t2i = topk_candidates(sim, k)
    pairs = unique_pairs(i2t, t2i)
    fill_scores(i2t, t2i, pairs, score_pairs(pairs).float().cpu(), sim.shape[1], itc_temp)
    return i2t, t2i


def rerank_all(sim: torch.Tensor, k: int, pair_logits: Callable[[torch.Tensor], torch.Tensor],
               temp: float | None, rules=RERANK_SCORES) -> dict[str, tuple[Candidates, Candidates]]:
    """`rerank` under every score rule from ONE batched ITM call (`pair_logits([P,2]) -> [P, 2]` logits): the
    rules differ only in how the same logits and cosines are combined."""
    i2t, t2i = topk_candidates(sim, k)
    pairs = unique_pairs(i2t, t2i)
    logits = pair_logits(pairs).float().cpu()
    out = {}
    for rule in rules:
        itm, itc_temp = rerank_terms(logits, rule, temp)
        a, b = Candidates(i2t.index, i2t.itc), Candidates(t2i.index, t2i.itc)
        fill_scores(a, b, pairs, itm, sim.shape[1], itc_temp)
        out[rule] = (a, b)
    return out


def naive_protocol(sim: torch.Tensor, k: int, itm_score: Callable[[int, int], float], itc_temp: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference protocol, literally (dense matrices, one row at a time), except that non-candidates keep
    their ITC order below every candidate (`TAIL + itc`) instead of a flat -100. `itm_score(i, j)` is a pair's
    ITM term, added to its ITC / `itc_temp` (1: the reference's sum).

    Used by the tests (and `blip2-bench eval`) as the ground truth for `rerank` + `ranks_from_candidates`.
    """
    n_img, n_txt = sim.shape
    score_i2t = sim.double() + TAIL  # float64: float32 at 1e4 would round ITC differences of 1e-3 away
    score_t2i = sim.t().double() + TAIL
    for i in range(n_img):
        v, idx = sim[i].topk(min(k, n_txt))
        for c, j in zip(v.tolist(), idx.tolist()):
            score_i2t[i, j] = fp32_sum(itm_score(i, j), c, itc_temp)
    for j in range(n_txt):
        v, idx = sim[:, j].topk(min(k, n_img))
        for c, i in zip(v.tolist(), idx.tolist()):
            score_t2i[j, i] = fp32_sum(itm_score(i, j), c, itc_temp)
    return score_i2t, score_t2i


def fp32_sum(a: float, b: float, b_divisor: float = 1.0) -> float:
    """ITM + ITC / divisor rounded as the fast path rounds it (float32), so exact ties stay ties."""
    itc = torch.tensor([b], dtype=torch.float32) / b_divisor
    return torch.tensor([a], dtype=torch.float32).add(itc).item()


def ranks_from_dense(score_i2t, score_t2i, txt2img, img2txt) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks from dense score matrices by a stable descending argsort (ties: smaller index first)."""
    r_i2t = []
    for i, row in enumerate(score_i2t):
        order = torch.argsort(row, descending=True, stable=True)
        r_i2t.append(torch.nonzero(torch.isin(order, torch.tensor(img2txt[i])))[0, 0].item())
    r_t2i = []
    for j, row in enumerate(score_t2i):
        order = torch.argsort(row, descending=True, stable=True)
        r_t2i.append(torch.nonzero(order == txt2img[j])[0, 0].item())
    return torch.tensor(r_i2t), torch.tensor(r_t2i)
