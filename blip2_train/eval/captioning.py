"""Captioning evaluation: batched beam search sharded over ranks, merged by image id, scored on rank 0
(`eval.metrics.captioning`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blip2_train.distributed.collectives import rank
from blip2_train.eval.generation import generate_on_every_rank, generate_texts
from blip2_train.eval.metrics.captioning import coco_format, prediction_image_id, score_tokenized, spice_plan, tokenize
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger(__name__)

CAPTION_GENERATION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "repetition_penalty": 1.0,
                      "length_penalty": 1.0}


def generate_captions(model, loader, tokenizer, prompt: str, generate_kwargs: dict, device,
                      image_blind: bool = False) -> list[tuple[int, str]]:
    """-> [(eval-set index, caption)] for this rank's images. `image_blind`: every image replaced by the same
    blank (mean-colour) image, the baseline that shows how much of a score comes from the language alone."""
    out = []
    for images, idx in tqdm(loader, desc="caption", disable=rank() != 0, leave=False):
        if image_blind:
            images = torch.zeros_like(images)
        texts = generate_texts(model, tokenizer, images, [prompt] * images.shape[0], generate_kwargs)
        out.extend(zip(idx.tolist(), texts))
    return out


def evaluate_captioning(model, data, loader, tokenizer, prompt: str = "", generate_kwargs: dict | None = None,
                        out_dir: str | Path | None = None, spice: str | bool = "auto",
                        image_blind: bool = False) -> dict[str, float]:
    """Generate for this rank's share of `data` (a CaptionedImages), merge on all ranks, score on rank 0.

    Writes `captions_predictions.json` ([{image_id, caption}]) and the COCO-format references beside the
    metrics. With `data.domains` (NoCaps), also scores each domain.
    """
    device = next(model.parameters()).device
    kw = {**CAPTION_GENERATION, **dict(generate_kwargs or {})}
    t0 = time.perf_counter()
    merged = generate_on_every_rank(
        model, lambda: generate_captions(model, loader, tokenizer, prompt, kw, device, image_blind))
    metrics: dict[str, float] = {}
    if rank() == 0:
        ids = [data.image_ids[i] for i in sorted(merged)]
        res = {data.image_ids[i]: merged[i] for i in sorted(merged)}
        gts = {data.image_ids[i]: data.raw_captions[i] for i in sorted(merged)}
        want_spice, notes = spice_plan(spice)
        g, r = tokenize(gts, res)
        metrics = score_tokenized(g, r, want_spice)
        domains = getattr(data, "domains", None)
        if domains:  # NoCaps: the same scorers on each domain's images
            for d in sorted(set(domains)):
                keep = [data.image_ids[i] for i in sorted(merged) if domains[i] == d]
                sub = score_tokenized({k: g[k] for k in keep}, {k: r[k] for k in keep}, want_spice)
                metrics.update({f"{d}/{k}": v for k, v in sub.items()})
        metrics["num_images"] = float(len(ids))
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            preds = [{"image_id": prediction_image_id(k), "caption": res[k]} for k in ids]
            name = "captions_predictions_blind.json" if image_blind else "captions_predictions.json"
            write_json_atomic(out / name, preds, sort_keys=False)
            write_json_atomic(out / "captions_references.json", coco_format(gts), sort_keys=False)
            if notes:
                (out / "captions_notes.txt").write_text("\n".join(notes) + "\n")
    metrics["eval_seconds"] = time.perf_counter() - t0
    log.info("captioning: %s", {k: round(v, 2) for k, v in metrics.items()})
    return metrics
