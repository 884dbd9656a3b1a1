"""Allowed ranges of numeric config values, in one table keyed by config path.

Types (and key names) are checked at composition by the structured-config schemas (cli/schemas.py, generated
from the `_target_` signatures); OmegaConf has no range constraints, so this table adds them: `data.batch_size=-3`
is one line before any work starts instead of a loader that never ends.
"""

from __future__ import annotations

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
}


# String settings with a fixed set of values, so that a typo is one line before any work, not an error after
# training (config imports nothing from eval: tests/unit/test_retrieval.py keeps these equal to the tuples of the code
# that reads them, eval.metrics.retrieval.RERANK_SCORES and eval.runner.EVAL_KINDS)
EVAL_KINDS = ("retrieval", "caption", "vqa")
RERANK_SCORES = ("reference", "product")
CHOICES: dict[str, tuple[str, ...]] = {
    "eval.kind": EVAL_KINDS,
    "eval.rerank_score": RERANK_SCORES,
    # the periodic evaluation follows eval.* unless set on its own
    "callbacks.periodic_eval.kind": EVAL_KINDS,
    "callbacks.periodic_eval.rerank_score": RERANK_SCORES,
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
    """Raise ConfigError naming the first configured value outside its range or its choices. Absent keys, nulls
    and non-numbers are left alone by the ranges (wrong types are refused by the schemas)."""
    from omegaconf import OmegaConf

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
