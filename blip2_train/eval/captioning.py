"""Captioning evaluation: batched beam search sharded over ranks, merged by image id, scored with pycocoevalcap.

pycocoevalcap's `COCOEvalCap.evaluate()` builds SPICE unconditionally; SPICE downloads Stanford CoreNLP on
first use, so offline the stock call returns nothing. We run the scorers ourselves (same tokenizer, same
scorers, same x100 reporting as the papers) and add SPICE only when its jars are already installed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blip2_train.eval.generation import generate_texts
from blip2_train.models.distributed import is_dist, rank
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger(__name__)

CAPTION_GENERATION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "repetition_penalty": 1.0,
                      "length_penalty": 1.0}


def spice_available() -> bool:
    import pycocoevalcap.spice as spice_pkg

    lib = Path(spice_pkg.__file__).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").exists() and (lib / "stanford-corenlp-3.6.0-models.jar").exists()


_METEOR = None


def _meteor():
    """One METEOR JVM per process (starting it costs ~5 s; pycocoevalcap would start one per call)."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def tokenize(gts: dict, res: dict) -> tuple[dict, dict]:
    """PTB-tokenize references and predictions (one Java call for both)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    missing = set(gts) ^ set(res)
    if missing:
        raise ValueError(f"{len(missing)} image(s) have references but no prediction or the reverse, e.g. "
                         f"{sorted(map(str, missing))[:3]}")
    both = {("g", k): [{"caption": c} for c in v] for k, v in gts.items()}
    both.update({("r", k): [{"caption": v}] for k, v in res.items()})
    tok = PTBTokenizer().tokenize(both)
    return {k: tok[("g", k)] for k in gts}, {k: tok[("r", k)] for k in res}


def score_tokenized(g: dict, r: dict, spice: bool = False) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), ["bleu1", "bleu2", "bleu3", "bleu4"]), (_meteor(), ["meteor"]), (Rouge(), ["rouge_l"]),
               (Cider(), ["cider"])]
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), ["spice"]))
    out = {}
    for scorer, names in scorers:
        score, _ = scorer.compute_score(g, r)
        for n, v in zip(names, score if isinstance(score, list) else [score]):
            out[n] = float(v) * 100.0
    return out


def score_captions(gts: dict, res: dict, spice: str | bool = "auto") -> tuple[dict[str, float], list[str]]:
    """gts {image_id: [reference captions]}, res {image_id: caption} -> (metrics x100, notes).

    Every image with a prediction must have references and vice versa: a silently partial score is worse
    than an error.
    """
    want_spice, notes = spice_plan(spice)
    g, r = tokenize(gts, res)
    return score_tokenized(g, r, want_spice), notes


def spice_plan(spice: str | bool) -> tuple[bool, list[str]]:
    """-> (run SPICE?, notes). `auto` runs it only when its jars are installed, and says so when not."""
    want = spice is True or (spice == "auto" and spice_available())
    notes = []
    if spice == "auto" and not want:
        notes.append("SPICE skipped: Stanford CoreNLP jars not installed in pycocoevalcap/spice/lib "
                     "(run pycocoevalcap's get_stanford_models once with network access)")
        log.warning(notes[-1])
    return want, notes


def prediction_image_id(image_id: str):
    return int(image_id) if str(image_id).isdigit() else image_id


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


def gather_objects(local: list) -> list:
    if not is_dist():
        return list(local)
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for p in parts for x in p]


def generate_on_every_rank(model, produce) -> dict:
    """In eval mode, this rank's `(index, output)` pairs from `produce()`, gathered from every rank and
    de-duplicated (padded shards repeat items); the model's training modes are restored after."""
    was_training = model.training
    model.eval()
    try:
        merged: dict = {}
        for i, out in gather_objects(list(produce())):
            merged.setdefault(i, out)
        return merged
    finally:
        if was_training and hasattr(model, "set_train_modes"):
            model.set_train_modes(True)


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


def coco_format(gts: dict) -> dict:
    """References as a COCO caption annotation file (what pycocotools' COCO() reads)."""
    images, anns = [], []
    for k, caps in gts.items():
        iid = prediction_image_id(k)
        images.append({"id": iid})
        anns.extend({"image_id": iid, "id": len(anns), "caption": c} for c in caps)
    return {"images": images, "annotations": anns, "type": "captions", "info": {}, "licenses": []}
