"""Retrieval evaluation (stage-1 models): images and texts encoded once and sharded over ranks, ITC top-k
candidates, each distinct candidate pair re-ranked by ITM once (`eval.metrics.retrieval` scores)."""

from __future__ import annotations

import logging
import math
import time

import torch
from tqdm import tqdm

from blip2_train.distributed.collectives import gather_varlen, rank, shard_range, world_size
from blip2_train.eval.generation import autocast
from blip2_train.eval.metrics import retrieval

log = logging.getLogger(__name__)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode_images(model, loader, device):
    """-> image tokens [n, N, Dv] (half precision on GPU: they are large) and ITC features [n, Q, D]."""
    embeds, feats = [], []
    keep_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for images, _ in tqdm(loader, desc="encode images", disable=rank() != 0, leave=False):
        with autocast(device):
            e, f = model.retrieval_image_embeds(images.to(device, non_blocking=True))
        embeds.append(e.to(keep_dtype))
        feats.append(f.float())
    if not embeds:
        return None, None
    return torch.cat(embeds), torch.cat(feats)


@torch.no_grad()
def encode_texts(model, input_ids, attention_mask, device, batch_size: int = 256):
    out = []
    for s in range(0, input_ids.shape[0], batch_size):
        with autocast(device):
            out.append(model.retrieval_text_feat(input_ids[s : s + batch_size].to(device),
                                                 attention_mask[s : s + batch_size].to(device)).float())
    # a rank with no texts gives [0, D], so that the gather's concatenation keeps its shape
    return torch.cat(out) if out else torch.zeros(0, model.config.image_text_hidden_size, device=device)


def itc_temperature(model) -> float:
    """The model's learnt ITC temperature (the "product" score's divisor of the cosine), clamped as training
    uses it."""
    from blip2_train.models.stage1 import TEMP_MAX, TEMP_MIN

    # never a DTensor: evaluation under sharded training is refused (cli.train: export and run blip2-eval)
    return float(model.temp.detach().float().reshape(-1)[0].clamp(TEMP_MIN, TEMP_MAX))


def score_rules(model, rerank_score: str) -> tuple[tuple[str, ...], float]:
    """(the score rules this model can be evaluated under, its ITC temperature). "product" needs the temperature
    the model learnt. A checkpoint without one (transformers' Blip2ForImageTextRetrieval stores none) is refused
    for it, by name, before any work; a non-finite one (a diverged run) is not refused, so that its evaluation
    still reports the reference's score and ITC alone (the product's recalls then read NaN). Either way the other
    rule's report leaves rerank_product/* out, with a warning."""
    from blip2_train.utils.errors import ConfigError

    temp = itc_temperature(model)
    missing = getattr(model, "temp_missing_from", None)
    if missing:
        why = f"{missing} holds no ITC temperature ('temp'; transformers' Blip2ForImageTextRetrieval stores none)"
        if rerank_score == "product":
            raise ConfigError(f"eval.rerank_score=product divides the ITC cosine by the learnt temperature, and "
                              f"{why}: use eval.rerank_score=reference")
    elif not math.isfinite(temp):
        why = f"the model's ITC temperature is {temp}"
    else:
        return retrieval.RERANK_SCORES, temp
    log.warning("rerank_product/* not computed: %s", why)
    return ("reference",), temp


@torch.no_grad()
def evaluate_retrieval(model, data, image_loader, tokenizer, image_range: tuple[int, int], k_test: int = 128,
                       pair_batch_size: int = 256, max_txt_len: int = 35,
                       rerank_score: str = "reference") -> dict[str, float]:
    """The reference retrieval protocol over `data` (a CaptionedImages), this rank encoding `image_range`.

    The unprefixed recalls re-rank with `rerank_score`; `rerank_<rule>/*` give every rule's, from the same ITM
    logits, and `itc_only/*` ITC alone (what re-ranking adds, or costs)."""
    if rerank_score not in retrieval.RERANK_SCORES:
        from blip2_train.utils.errors import ConfigError

        raise ConfigError(f"eval.rerank_score={rerank_score!r} is not one of {list(retrieval.RERANK_SCORES)}")
    rules, temp = score_rules(model, rerank_score)  # before any work: a refused rule costs nothing
    device = _device_of(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    tok = tokenizer(data.texts, padding="longest", truncation=True, max_length=max_txt_len, return_tensors="pt")
    ids, mask = tok["input_ids"], tok["attention_mask"]

    image_embeds_local, image_feats_local = encode_images(model, image_loader, device)
    lo, hi = image_range
    if image_feats_local is None:  # a rank with no images still takes part in the gathers
        image_feats_local = torch.zeros(0, model.num_query_tokens, model.config.image_text_hidden_size, device=device)
    t_lo, t_hi = shard_range(ids.shape[0], rank(), world_size())
    text_feat = gather_varlen(encode_texts(model, ids[t_lo:t_hi], mask[t_lo:t_hi], device))
    # ITC rows of this rank's images only, then the rows of all ranks: each rank computes 1/W of the matrix
    # (and no rank gathers the others' [n, Q, D] image features).
    log.info("rank %d/%d computes ITC rows [%d, %d) x %d texts", rank(), world_size(), lo, hi, text_feat.shape[0])
    sim = gather_varlen(retrieval.itc_similarity(image_feats_local, text_feat)).cpu()
    t_itc = time.perf_counter() - t0

    text_len = mask.sum(dim=1)

    def pair_logits(pairs: torch.Tensor) -> torch.Tensor:
        mine = pairs[(pairs[:, 0] >= lo) & (pairs[:, 0] < hi)]
        # Batches of pairs with similar text length, each cut to its longest text: no compute on padding.
        order = torch.argsort(text_len[mine[:, 1]], stable=True)
        local = torch.zeros(mine.shape[0], 2, device=device)
        for s in tqdm(range(0, mine.shape[0], pair_batch_size), desc="ITM re-rank", disable=rank() != 0,
                      leave=False):
            sel = order[s : s + pair_batch_size]
            p = mine[sel]
            width = int(text_len[p[:, 1]].max())
            with autocast(device):
                logits = model.itm_forward(image_embeds_local[p[:, 0] - lo].float(), ids[p[:, 1], :width].to(device),
                                           mask[p[:, 1], :width].to(device))
            local[sel.to(device)] = logits.float()  # (no match, match): each score rule reads them its way
        # Pairs are sorted by image and image ranges are contiguous in rank order: concatenation = pair order.
        return gather_varlen(local)

    by_rule = {rule: retrieval.recall_metrics(*retrieval.ranks_from_candidates(
        i2t, t2i, data.txt2img, data.img2txt, sim)) for rule, (i2t, t2i) in
        retrieval.rerank_all(sim, k_test, pair_logits, temp, rules).items()}
    # the headline: the configured rule's recalls (NaN where that rule could not score: score_rules)
    metrics = dict(by_rule.get(rerank_score) or {k: float("nan") for k in by_rule["reference"]})
    for rule, m in by_rule.items():
        metrics.update({f"rerank_{rule}/{k}": v for k, v in m.items()})
    # ITC alone beside the re-ranked numbers: what the ITM re-ranking adds (or costs)
    itc_only = retrieval.recall_metrics(*retrieval.itc_ranks(sim, data.txt2img, data.img2txt))
    metrics.update({f"itc_only/{k}": v for k, v in itc_only.items()})
    metrics["itc_temp"] = temp
    metrics["eval_seconds"] = time.perf_counter() - t0
    metrics["eval_itc_seconds"] = t_itc
    model.train(was_training)
    if hasattr(model, "set_train_modes") and was_training:
        model.set_train_modes(True)
    log.info("retrieval: %s", {k: round(v, 2) for k, v in metrics.items()})
    return metrics
