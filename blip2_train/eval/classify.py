"""Zero-shot image classification with a stage-1 model: CLIP's protocol on BLIP-2's ITC and ITM heads.

- Each class name fills every prompt template ("a photo of a {}."); the filled prompts are cleaned as captions
  are (`clean_caption`) and encoded by the Q-Former's text pass: the normalised [CLS] projection (ITC's text
  feature).
- Prompt ensembling (`ensemble`): "mean" (CLIP's) averages a class's prompt features and renormalises, one
  feature per class; "max" keeps every prompt and scores a class by its best-matching prompt.
- ITC score of (image, class) = max over the query tokens of the cosine, as retrieval scores (image, text).
- `itm_topk=K` re-ranks each image's K best classes by ITC with the ITM match probability (softmax of the match
  logits, averaged over the class's prompts under "mean", their max under "max"); the re-ranked K come first, in
  that order (ties kept in ITC order), then the other classes in ITC order. ITM alone decides among the K, as in
  the reference's retrieval re-ranking, where the match logit outweighs any cosine difference.

The evaluation reports top-1 / top-5 and per-class accuracy (percent) and their mean over classes, with ITC alone
beside the re-ranked numbers (`itc_only/*`). On N ranks each takes a contiguous share of the images, every rank
encodes its share of the prompts, and the predictions are gathered in image order: the same metrics on any N.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from blip2_train.distributed.collectives import gather_varlen, rank, shard_range, world_size
from blip2_train.eval.generation import autocast
from blip2_train.eval.metrics.retrieval import itc_similarity
from blip2_train.utils.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # conf/eval_protocol/default.yaml's eval.classify.templates
ENSEMBLES = ("mean", "max")
TOPK = 5  # the "top-5" of top-5 accuracy (fewer when there are fewer classes)
MAX_NAMED = 10  # skipped images named in one line before "+N more"
CONFUSION_PLOT_MAX_CLASSES = 60  # past this a confusion plot is unreadable (and the matrix is in the predictions)


def check_classes(classes, where: str = "labels") -> list[str]:
    """Class names as a list of distinct non-empty strings; ConfigError (one line) otherwise."""
    if isinstance(classes, str) or not isinstance(classes, (list, tuple)):
        raise ConfigError(f"{where}: give a list of class names, not {type(classes).__name__}")
    names = [str(c).strip() for c in classes]
    if not names or not any(names):
        raise ConfigError(f"{where}: the class list is empty: give at least two class names")
    if not all(names):
        raise ConfigError(f"{where}: class {names.index('') + 1} of {len(names)} is an empty name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: class name(s) given twice: {', '.join(dup)}")
    return names


def check_templates(templates, where: str = "eval.classify.templates") -> list[str]:
    """Prompt templates, each with the class name's place `{}`; ConfigError (one line) otherwise."""
    if templates is None:
        return list(DEFAULT_TEMPLATES)
    if isinstance(templates, str):
        templates = [templates]
    templates = [str(t) for t in templates]
    if not templates:
        raise ConfigError(f"{where}: no prompt template: give at least one, e.g. {DEFAULT_TEMPLATES[0]!r}")
    for t in templates:
        if "{}" not in t:
            raise ConfigError(f"{where}: template {t!r} has no '{{}}' for the class name (e.g. "
                              f"{DEFAULT_TEMPLATES[0]!r})")
    return templates


def check_ensemble(ensemble: str, where: str = "eval.classify.ensemble") -> str:
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"{where}={ensemble!r} must be one of {list(ENSEMBLES)}")
    return ensemble


def fill(template: str, name: str) -> str:
    from blip2_train.data.captions import clean_caption

    return clean_caption(template.replace("{}", name), 50)


@dataclass
class Ranked:
    """Each image's `top` classes [n, k] (best first) with their ITC cosine [n, k] and ITM match probability
    [n, k] (NaN where not re-ranked), and ITC's own top [n, k] (what re-ranking changed)."""

    top: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itc_top: torch.Tensor


class ZeroShotClassifier:
    """Class prompts encoded once; `rank(pixels)` -> each image's best classes.

    The prompts are tokenised together (one padding for all, so a prompt's tokens do not depend on which others
    share its batch); with `shard=True` each rank encodes its share of them and the features are gathered."""

    def __init__(self, model, tokenizer, classes, templates=None, ensemble: str = "mean", max_txt_len: int = 35,
                 text_batch_size: int = 256, shard: bool = False):
        self.model = model
        self.classes = check_classes(classes)
        self.templates = check_templates(templates)
        self.ensemble = check_ensemble(ensemble)
        self.device = next(model.parameters()).device
        T = len(self.templates)
        prompts = [fill(t, c) for c in self.classes for t in self.templates]  # class-major: row c * T + t
        tok = tokenizer(prompts, padding="longest", truncation=True, max_length=max_txt_len, return_tensors="pt")
        self.ids, self.mask = tok["input_ids"], tok["attention_mask"]
        lo, hi = shard_range(len(prompts), rank(), world_size()) if shard else (0, len(prompts))
        feats = []
        with torch.no_grad():
            for s in range(lo, hi, text_batch_size):
                e = min(hi, s + text_batch_size)
                with autocast(self.device):
                    feats.append(model.retrieval_text_feat(self.ids[s:e].to(self.device),
                                                           self.mask[s:e].to(self.device)).float())
        dim = model.config.image_text_hidden_size
        local = torch.cat(feats) if feats else torch.zeros(0, dim, device=self.device)
        self.text_feats = (gather_varlen(local) if shard else local).view(len(self.classes), T, -1)  # [C, T, D]
        # CLIP's ensemble: the mean of the normalised prompt features, renormalised
        self.class_feats = torch.nn.functional.normalize(self.text_feats.mean(dim=1), dim=-1)  # [C, D]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def itc(self, image_feats: torch.Tensor) -> torch.Tensor:
        """[n, Q, D] -> [n, C]: max over queries of the cosine with the class feature ("mean"), or with each
        prompt's, then the best prompt ("max")."""
        if self.ensemble == "mean":
            return itc_similarity(image_feats, self.class_feats)
        C, T, _ = self.text_feats.shape
        return itc_similarity(image_feats, self.text_feats.reshape(C * T, -1)).view(-1, C, T).amax(dim=2)

    @torch.no_grad()
    def itm_prob(self, image_embeds: torch.Tensor, candidates: torch.Tensor,
                 pair_batch_size: int = 256) -> torch.Tensor:
        """ITM match probability of each (image, candidate class) [n, K], over the class's prompts (mean or max)."""
        n, K = candidates.shape
        T = len(self.templates)
        rows = (candidates[:, :, None] * T + torch.arange(T, device=candidates.device)).reshape(-1).cpu()
        images = torch.arange(n).repeat_interleave(K * T)
        lengths = self.mask.sum(dim=1)
        out = torch.empty(rows.shape[0], device=self.device)
        for s in range(0, rows.shape[0], pair_batch_size):
            r, i = rows[s : s + pair_batch_size], images[s : s + pair_batch_size]
            width = int(lengths[r].max())  # cut to the longest prompt of the batch: no compute on padding
            with autocast(self.device):
                logits = self.model.itm_forward(image_embeds[i.to(image_embeds.device)].float(),
                                                self.ids[r, :width].to(self.device),
                                                self.mask[r, :width].to(self.device))
            out[s : s + r.shape[0]] = logits.float().softmax(dim=-1)[:, 1]
        p = out.view(n, K, T)
        return p.mean(dim=2) if self.ensemble == "mean" else p.amax(dim=2)

    @torch.no_grad()
    def rank(self, pixels: torch.Tensor, topk: int = TOPK, itm_topk: int = 0, pair_batch_size: int = 256) -> Ranked:
        with autocast(self.device):
            embeds, feats = self.model.retrieval_image_embeds(pixels.to(self.device))
        return self.rank_features(embeds, feats.float(), topk, itm_topk, pair_batch_size)

    def rank_features(self, embeds, feats, topk: int = TOPK, itm_topk: int = 0, pair_batch_size: int = 256) -> Ranked:
        sim = self.itc(feats)
        k = min(topk, self.num_classes)
        # stable: of tied classes the earlier one first, on every device and rank
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices
        itc_top = order[:, :k]
        itm = torch.full((sim.shape[0], k), float("nan"), device=sim.device)
        K = min(itm_topk, self.num_classes)
        if K > 0:
            cand = order[:, :K]
            p = self.itm_prob(embeds, cand, pair_batch_size)
            by_itm = torch.sort(p, dim=1, descending=True, stable=True)  # ties keep the candidates' ITC order
            order = torch.cat([cand.gather(1, by_itm.indices), order[:, K:]], dim=1)
            m = min(k, K)
            itm[:, :m] = by_itm.values[:, :m]
        top = order[:, :k]
        return Ranked(top=top, itc=sim.gather(1, top), itm=itm, itc_top=itc_top)

    def results(self, ranked: Ranked) -> list[list[dict]]:
        """Per image, its top classes best first: {"label", "itc"} (+ "itm" where ITM re-ranked it)."""
        out = []
        for top, itc, itm in zip(ranked.top.tolist(), ranked.itc.tolist(), ranked.itm.tolist()):
            out.append([{"label": self.classes[c], "itc": round(s, 6), **({} if math.isnan(m) else
                                                                           {"itm": round(m, 6)})}
                        for c, s, m in zip(top, itc, itm)])
        return out


def accuracy_metrics(top: torch.Tensor, labels: torch.Tensor, classes: list[str], prefix: str = "") -> dict:
    """Percent: top-1, top-5 (top-k for k = top's width), each class's top-1 and their mean over the classes that
    have images. `top` [n, k] and `labels` [n] of the scored images only."""
    n = labels.shape[0]
    hit1 = (top[:, 0] == labels).float() if n else torch.zeros(0)
    hitk = (top == labels[:, None]).any(dim=1).float() if n else torch.zeros(0)
    m = {f"{prefix}top1": 100.0 * float(hit1.mean()) if n else float("nan"),
         f"{prefix}top5": 100.0 * float(hitk.mean()) if n else float("nan")}
    per = {}
    for c, name in enumerate(classes):
        sel = labels == c
        if bool(sel.any()):
            per[name] = 100.0 * float(hit1[sel].mean())
    m[f"{prefix}mean_per_class"] = sum(per.values()) / len(per) if per else float("nan")
    m.update({f"{prefix}per_class/{name}": v for name, v in per.items()})
    return m


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted (top-1)."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, -1)


def confusion_plot(confusion: torch.Tensor, classes: list[str], path, title: str) -> bool:
    """A PNG of the row-normalised confusion matrix; False (and nothing written) past
    CONFUSION_PLOT_MAX_CLASSES classes, where it would be unreadable."""
    if len(classes) > CONFUSION_PLOT_MAX_CLASSES:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    side = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rows.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _named(items: list[str]) -> str:
    more = len(items) - MAX_NAMED
    return ", ".join(items[:MAX_NAMED]) + (f" (+{more} more)" if more > 0 else "")


@torch.no_grad()
def evaluate_classify(model, data, loader, tokenizer, templates=None, ensemble: str = "mean", itm_topk: int = 0,
                      pair_batch_size: int = 256, max_txt_len: int = 35, out_dir=None) -> dict[str, float]:
    """Zero-shot classification of `data` (a LabelledImages), this rank classifying the images of `loader` (its
    contiguous share). Metrics on every rank; rank 0 writes classify_predictions.json and classify_confusion.png
    to `out_dir`. Unreadable images are skipped, counted (`num_skipped`) and named."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    head = ZeroShotClassifier(model, tokenizer, data.classes, templates, ensemble, max_txt_len, shard=True)
    log.info("classify: %d classes x %d template(s), ensemble=%s, itm_topk=%d", head.num_classes,
             len(head.templates), head.ensemble, itm_topk)
    k = min(TOPK, head.num_classes)
    parts: dict[str, list] = {"index": [], "ok": [], "top": [], "itc": [], "itm": [], "itc_top": []}
    for images, index, reasons in tqdm(loader, desc="classify", disable=rank() != 0, leave=False):
        for why in reasons:
            if why:
                log.warning("skipped unreadable image %s", why)
        r = head.rank(images, TOPK, itm_topk, pair_batch_size)
        parts["index"].append(index.to(device))
        parts["ok"].append(torch.tensor([not w for w in reasons], device=device))
        for key in ("top", "itc", "itm", "itc_top"):
            parts[key].append(getattr(r, key))
    empty = {"index": torch.zeros(0, dtype=torch.long, device=device),
             "ok": torch.zeros(0, dtype=torch.bool, device=device),
             "top": torch.zeros(0, k, dtype=torch.long, device=device), "itc": torch.zeros(0, k, device=device),
             "itm": torch.zeros(0, k, device=device), "itc_top": torch.zeros(0, k, dtype=torch.long, device=device)}
    # shares are contiguous and in rank order: the gathered rows are the images in order
    full = {key: gather_varlen(torch.cat(v) if v else empty[key]).cpu() for key, v in parts.items()}
    if not torch.equal(full["index"], torch.arange(len(data))):
        raise RuntimeError("classify: the gathered predictions are not the images in order")
    ok = full["ok"].bool()
    labels = torch.tensor(data.labels, dtype=torch.long)
    accuracy = accuracy_metrics(full["top"][ok], labels[ok], head.classes)
    skipped = [data.image_ids[i] for i in (~ok).nonzero().flatten().tolist()]
    # the headline figures first (the run's summary prints the first few), each class's last
    metrics = {k: v for k, v in accuracy.items() if not k.startswith("per_class/")}
    metrics["chance_top1"] = 100.0 / head.num_classes
    if itm_topk > 0:  # ITC alone beside the re-ranked numbers: what re-ranking adds (or costs)
        itc_only = accuracy_metrics(full["itc_top"][ok], labels[ok], head.classes, "itc_only/")
        metrics.update({key: v for key, v in itc_only.items() if "/per_class/" not in key})
    metrics.update({"num_images": float(int(ok.sum())), "num_skipped": float(len(skipped)),
                    "num_classes": float(head.num_classes)})
    metrics.update({k: v for k, v in accuracy.items() if k.startswith("per_class/")})
    metrics["eval_seconds"] = time.perf_counter() - t0
    if skipped and rank() == 0:
        log.warning("classify: skipped %d unreadable image(s) of %d: %s", len(skipped), len(data), _named(skipped))
    if int(ok.sum()) == 0:
        from blip2_train.utils.errors import DataError

        raise DataError(f"{data.source}: none of its {len(data)} image(s) could be read")
    if out_dir is not None and rank() == 0:
        write_outputs(out_dir, data, head, full, ok, labels, metrics)
    model.train(was_training)
    if hasattr(model, "set_train_modes") and was_training:
        model.set_train_modes(True)
    log.info("classify: top1 %.2f top5 %.2f mean per class %.2f (chance %.2f)", metrics["top1"], metrics["top5"],
             metrics["mean_per_class"], metrics["chance_top1"])
    return metrics


def write_outputs(out_dir, data, head: ZeroShotClassifier, full: dict, ok: torch.Tensor, labels: torch.Tensor,
                  metrics: dict) -> None:
    """classify_predictions.json: per image its label, top classes and scores (or that it was skipped), and the
    confusion matrix; classify_confusion.png: that matrix row-normalised (up to CONFUSION_PLOT_MAX_CLASSES)."""
    from pathlib import Path

    from blip2_train.utils.io import write_json_atomic

    out_dir = Path(out_dir)
    preds = []
    for i in range(len(data)):
        rec = {"image": data.image_ids[i], "label": head.classes[data.labels[i]]}
        if not bool(ok[i]):
            rec["skipped"] = True
        else:
            rec["top"] = [head.classes[c] for c in full["top"][i].tolist()]
            rec["itc"] = [round(v, 6) for v in full["itc"][i].tolist()]
            itm = [round(v, 6) for v in full["itm"][i].tolist() if not math.isnan(v)]
            if itm:
                rec["itm"] = itm
        preds.append(rec)
    conf = confusion_matrix(full["top"][ok][:, 0], labels[ok], head.num_classes)
    write_json_atomic(out_dir / "classify_predictions.json",
                      {"classes": head.classes, "templates": head.templates, "ensemble": head.ensemble,
                       "confusion": conf.tolist(), "predictions": preds})
    title = f"top-1 {metrics['top1']:.1f}% (chance {metrics['chance_top1']:.1f}%), {int(ok.sum())} images"
    if "itc_only/top1" in metrics:
        title += f"; ITM re-ranked (ITC alone: {metrics['itc_only/top1']:.1f}%)"
    if not confusion_plot(conf, head.classes, out_dir / "classify_confusion.png", title):
        log.info("classify: no confusion plot for %d classes (the matrix is in classify_predictions.json)",
                 head.num_classes)


def evaluate_classify_set(model, datamodule, cfg, out_dir=None) -> dict[str, float]:
    """`eval.kind=classify`: the image folder or CSV of `data.eval_set`, the settings of `eval.classify`."""
    from blip2_train.data.image_folder import labelled_image_loader, read_labelled_images

    c = dict(cfg.get("classify") or {})
    templates = check_templates(list(c["templates"]) if c.get("templates") is not None else None)
    ensemble = check_ensemble(str(c.get("ensemble", "mean")))
    data = read_labelled_images(datamodule.eval_set_cfg or {})
    r, w = rank(), world_size()
    lo, hi = shard_range(len(data), r, w)
    log.info("rank %d/%d encodes images [%d, %d) of %d", r, w, lo, hi, len(data))
    loader = labelled_image_loader(data, datamodule.eval_image_size, datamodule.eval_batch_size,
                                   datamodule.num_workers, r, w)
    return evaluate_classify(model, data, loader, datamodule.tokenizer, templates, ensemble,
                             int(c.get("itm_topk", 0)), int(cfg.get("pair_batch_size", 256)), out_dir=out_dir)
