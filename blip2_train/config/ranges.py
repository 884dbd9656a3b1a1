"""Allowed ranges of numeric config values, in one table keyed by config path.

Types (and key names) are checked at composition by the structured-config schemas (cli/schemas.py, generated
from the `_target_` signatures); OmegaConf has no range constraints, so this table adds them: `data.batch_size=-3`
is one line before any work starts instead of a loader that never ends. Beyond the table: no float anywhere in
the config may be NaN or infinite (every comparison with NaN is false, so a range alone lets it through), and
the image sizes must fit the ViT's patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blip2_train.utils.errors import ConfigError


@dataclass(frozen=True)
class Range:
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    also: tuple = ()  # sentinel values allowed besides the range (e.g. -1 = unlimited)

    def allows(self, v) -> bool:
        if v in self.also:
            return True
        if not math.isfinite(v):
            return False
        return not ((self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                    or (self.le is not None and v > self.le))

    def describe(self) -> str:
        parts = [f">= {self.ge:g}" if self.ge is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                 f"<= {self.le:g}" if self.le is not None else ""]
        text = " and ".join(p for p in parts if p)
        return text + "".join(f" (or {a})" for a in self.also)


POSITIVE, NON_NEGATIVE, FRACTION = Range(ge=1), Range(ge=0), Range(ge=0, le=1)

RANGES: dict[str, Range] = {
    # data
    "data.batch_size": POSITIVE,
    "data.eval_batch_size": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.image_size": POSITIVE,
    "data.eval_image_size": POSITIVE,
    "data.samples_per_epoch": POSITIVE,
    "data.shuffle_buffer": NON_NEGATIVE,
    "data.max_skip_rate": FRACTION,
    "data.min_scale": Range(gt=0, le=1),
    "data.max_words": POSITIVE,
    "data.max_txt_len": POSITIVE,
    # model
    "model.num_query_tokens": POSITIVE,
    "model.embed_dim": POSITIVE,
    "arch.num_query_tokens": POSITIVE,
    "arch.embed_dim": POSITIVE,
    # optimisation and steps (trainer first: module.max_steps interpolates trainer.max_steps)
    "trainer.max_steps": Range(ge=1, also=(-1,)),
    "trainer.accumulate_grad_batches": POSITIVE,
    "module.lr": Range(gt=0),
    "module.min_lr": NON_NEGATIVE,
    "module.warmup_steps": NON_NEGATIVE,
    "module.max_steps": Range(ge=1, also=(-1,)),  # -1: from the epochs (trainer.max_epochs)
    "callbacks.model_checkpoint.every_n_train_steps": NON_NEGATIVE,
    # evaluation (both roots' eval)
    "eval.k_test": POSITIVE,
    "eval.pair_batch_size": POSITIVE,
    "eval.classify.itm_topk": NON_NEGATIVE,
}


# String settings with a fixed set of values, so that a typo is one line before any work, not an error after
# training (config imports nothing from eval: tests/unit/test_retrieval.py keeps these equal to the tuples of the code
# that reads them, eval.metrics.retrieval.RERANK_SCORES and eval.runner.EVAL_KINDS; tests/unit/test_vqa_scorers.py
# keeps VQA_METRICS equal to eval.metrics.vqa.VQA_METRICS)
EVAL_KINDS = ("retrieval", "caption", "vqa", "classify")
RERANK_SCORES = ("reference", "product")
CLASSIFY_ENSEMBLES = ("mean", "max")  # = eval.classify.ENSEMBLES (tests/unit/test_classify_scoring.py)
VQA_METRICS = ("reference", "official")
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.kind": EVAL_KINDS,
    "eval.rerank_score": RERANK_SCORES,
    "eval.vqa_metric": VQA_METRICS,
    "eval.classify.ensemble": CLASSIFY_ENSEMBLES,
    # the periodic evaluation follows eval.* unless set on its own
    "callbacks.periodic_eval.kind": EVAL_KINDS,
    "callbacks.periodic_eval.rerank_score": RERANK_SCORES,
    "callbacks.periodic_eval.vqa_metric": VQA_METRICS,
    # models/adapters.py and models/quant.py read these
    "adapter.kind": ("none", "lora"),
    "model.llm_quant": ("int8", "nf4"),
    "model.vision_quant": ("int8", "nf4"),
}
_UNSET = object()


def _value(cfg, key: str):
    """The configured value at `key`, None when absent or null, _UNSET when its interpolation cannot resolve
    (reported where it is used)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # noqa: BLE001 - an unresolvable interpolation is reported where it is used
        return _UNSET


def check_ranges(cfg, ranges: dict[str, Range] = RANGES, choices: dict[str, tuple] = CHOICES) -> None:
    """Raise ConfigError naming the first configured value outside its range or its choices, the first float
    that is not finite, or an image size the ViT cannot take. Absent keys, nulls and non-numbers are left alone
    by the ranges (wrong types are refused by the schemas)."""
    from omegaconf import OmegaConf

    for key, v in _floats(cfg):
        if not math.isfinite(v):
            rng = ranges.get(key)
            allowed = f"a finite number {rng.describe()}" if rng else "a finite number"
            raise ConfigError(f"config value {key}={v!r} is not a finite number: must be {allowed}")
    for key, allowed in choices.items():
        v = _value(cfg, key)
        if v is not None and v is not _UNSET and v not in allowed:
            raise ConfigError(f"config value {key}={v!r}{_source(cfg, key)} must be one of {list(allowed)}")
    for key, rng in ranges.items():
        v = _value(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not rng.allows(v):
            raise ConfigError(f"config value {key}={v!r}{_source(cfg, key)} is out of range: must be {rng.describe()}")
    steps, epochs = OmegaConf.select(cfg, "trainer.max_steps", default=None), OmegaConf.select(
        cfg, "trainer.max_epochs", default=None)
    if steps == -1 and epochs in (None, -1):  # Lightning's "no limit" twice: the lr schedule needs a length
        raise ConfigError("config value trainer.max_steps=-1 is out of range without trainer.max_epochs: set one of "
                          "them (the lr schedule needs a length)")
    check_image_sizes(cfg)


# Where the ViT's patch size lives: the model's own vision node (what is built), else the arch it reads.
PATCH_SIZE_KEYS = ("model.vision.patch_size", "arch.vision.patch_size")
# The sizes images are given to the ViT at (the eval loader's is data.image_size unless set), and the size the
# ViT's position embeddings are built for (model.vision.image_size, `${data.image_size}` in the shipped configs).
IMAGE_SIZE_KEYS = ("data.image_size", "data.eval_image_size", "model.vision.image_size")


def check_image_sizes(cfg) -> None:
    """An image size the ViT cannot take is one line: smaller than a patch (the patch convolution fails) or not
    a multiple of the patch size (the pixels past the last whole patch are silently dropped). The loader's sizes
    must also be the one the ViT is built for: its position embeddings fit one patch grid, so smaller images
    would silently use the first of them and larger ones fail. (An export trained at 224 px is evaluated at
    364 px by building the model at 364: its position embeddings are interpolated when it is loaded.)"""
    patch_key = next((k for k in PATCH_SIZE_KEYS if _int(_value(cfg, k)) is not None), None)
    if patch_key is None:
        return
    patch = _int(_value(cfg, patch_key))
    patch_key = _set_at(cfg, patch_key)
    for key in IMAGE_SIZE_KEYS:
        size = _int(_value(cfg, key))
        if size is None or size <= 0:  # absent, null, or refused by the ranges
            continue
        if size < patch or size % patch:
            near = sorted({max(patch, size // patch * patch), (size // patch + 1) * patch})
            raise ConfigError(f"config value {key}={size}{_source(cfg, key)} does not fit the ViT's patch size "
                              f"({patch_key}={patch}): must be a multiple of {patch}, e.g. "
                              f"{' or '.join(map(str, near))}")
    built = _int(_value(cfg, "model.vision.image_size"))
    loaded = _int(_value(cfg, "data.image_size"))
    if built is not None and loaded is not None and built != loaded:
        raise ConfigError(f"config value model.vision.image_size={built}{_source(cfg, 'model.vision.image_size')} is "
                          f"not data.image_size={loaded}, the size images are loaded at: set the size as "
                          "data.image_size alone (the ViT's image_size follows it)")
    evaluated = _int(_value(cfg, "data.eval_image_size"))
    if evaluated is not None and built is not None and evaluated != built:
        raise ConfigError(f"config value data.eval_image_size={evaluated} is not the size the ViT is built for "
                          f"(model.vision.image_size={built}): its position embeddings fit that size alone; to "
                          f"evaluate at {evaluated} px set data.image_size={evaluated} (an export or checkpoint "
                          "loaded into the model has its position embeddings interpolated to it)")


def _set_at(cfg, key: str) -> str:
    """The key a user sets for `key`: `model.vision.patch_size` is `arch.vision.patch_size` where `model.vision`
    is `${arch.vision}`."""
    import re

    from omegaconf import OmegaConf

    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head, _, name = ".".join(parts[:i]).rpartition(".")
        try:
            raw = (OmegaConf.select(cfg, head) if head else cfg)._get_node(name)._value()
        except Exception:  # noqa: BLE001 - no raw node: the key as given
            return key
        m = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if m:
            return _set_at(cfg, ".".join([m.group(1), *parts[i:]]))
    return key


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _floats(cfg, prefix: str = ""):
    """(key, value) for every float in the config where it is set: an interpolation is skipped, its source is
    visited under its own key (a NaN is reported once, under the key the user set)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(cfg, DictConfig):
        children = ((str(k), cfg._get_node(k)) for k in cfg.keys())
    else:
        children = ((str(i), cfg._get_node(i)) for i in range(len(cfg)))
    for name, node in children:
        if node is None or node._is_missing() or node._is_interpolation() or node._is_none():
            continue
        if isinstance(node, (DictConfig, ListConfig)):
            yield from _floats(node, f"{prefix}{name}.")
            continue
        v = node._value()
        if isinstance(v, float):
            yield f"{prefix}{name}", v


def _source(cfg, key: str) -> str:
    """' (from ${other.key})' when the value is an interpolation: the user set the other key."""
    from omegaconf import OmegaConf

    parent, _, name = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    try:
        raw = node._get_node(name)._value()
    except Exception:  # noqa: BLE001 - no raw node to show: name the key alone
        return ""
    return f" (from {raw})" if isinstance(raw, str) and "${" in raw else ""
