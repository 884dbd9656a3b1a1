"""One raw tar sample -> a training sample, or a counted skip with its reason; rate-limited data warnings."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from typing import Callable

from blip2_train.data.captions import as_caption_list, clean_caption, pick_caption
from blip2_train.data.transforms import ImageDecodeError
from blip2_train.utils.hashing import image_id_to_int

log = logging.getLogger(__name__)


@dataclass
class SkipCounter:
    seen: int = 0
    skipped: int = 0
    reasons: dict = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


class WarningLimiter:
    """Rate-limited warnings: a stream re-reading a bad shard, or a source full of bad images, cannot flood
    the log. Warnings of one key (the message itself, or a `kind` such as "bad image") are logged in full the
    first `first` times, then at the 10th, 100th, 1000th... with the count; `summary()` gives one line per key
    with its total when more occurred than were logged."""

    def __init__(self, logger: logging.Logger = log, first_of_kind: int = 10):
        self.logger, self.first_of_kind = logger, first_of_kind
        self.counts: dict[str, int] = {}
        self.logged: dict[str, int] = {}
        self.latest: dict[str, str] = {}

    def warn(self, msg: str, kind: str | None = None) -> None:
        key = kind or msg
        n = self.counts[key] = self.counts.get(key, 0) + 1
        self.latest[key] = msg
        if n <= (self.first_of_kind if kind else 1):
            self.logger.warning(msg)
        elif n == 10 ** (len(str(n)) - 1):  # 10, 100, 1000, ...
            self.logger.warning("%s (%d %s so far)", msg, n, f"'{kind}' warnings" if kind else "times")
        else:
            return
        self.logged[key] = n

    def summary(self) -> None:
        for key, n in self.counts.items():
            if n > self.logged.get(key, 0):
                if key == self.latest[key]:
                    self.logger.warning("%s (%d times in all)", key, n)
                else:
                    self.logger.warning("%d '%s' warnings in all (latest: %s)", n, key, self.latest[key])
                self.logged[key] = n


class SampleDecoder:
    """Raw tar sample -> {image, caption, image_id} or None (skip, counted with its reason). Subclasses change
    which texts a sample offers (`texts_of`) and what is drawn from them (`fields`)."""

    def __init__(self, transform, max_words: int = 50, max_pixels: int = 64_000_000,
                 jpeg_draft: bool = True):
        self.transform = transform
        self.max_words = max_words
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft

    def captions_of(self, sample: dict) -> tuple[list[str], object]:
        """-> (captions from .json `caption` or else .txt, the json's image_id or None)."""
        meta = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        caps = as_caption_list(meta.get("caption")) if isinstance(meta, dict) else []
        if not caps and "txt" in sample:
            caps = [sample["txt"].decode("utf-8", errors="replace")]
        return caps, (meta.get("image_id") if isinstance(meta, dict) else None)

    # what a sample without usable text is skipped as (its counter reason, its warning)
    no_text = ("no caption", "no non-empty caption")

    def texts_of(self, sample: dict) -> tuple[list, object]:
        """-> (the sample's usable texts, its json's image_id or None): here its cleaned captions."""
        caps, image_id = self.captions_of(sample)
        return [c for c in (clean_caption(c, self.max_words) for c in caps) if c], image_id

    def fields(self, texts: list, rng: random.Random) -> dict:
        """The sample's text fields, drawn from `texts` after the image (its crop) with the same `rng`."""
        return {"caption": pick_caption(texts, rng)}

    def __call__(self, sample: dict, rng: random.Random, counter: SkipCounter,
                 warn: Callable[..., None] | None = None) -> dict | None:
        warn = warn or (lambda msg, kind=None: log.warning(msg))
        counter.seen += 1
        key = sample.get("__key__", "?")
        image_bytes = sample.get("jpg") or sample.get("jpeg") or sample.get("png") or sample.get("webp")
        if image_bytes is None:
            counter.skip("no image")
            warn(f"skip {key} in {sample.get('__url__')}: sample has no image", "no image")
            return None
        texts, image_id = self.texts_of(sample)
        if not texts:
            reason, message = self.no_text
            counter.skip(reason)
            warn(f"skip {key} in {sample.get('__url__')}: {message}", reason)
            return None
        try:
            image = self.transform.decode(image_bytes, rng, self.max_pixels, draft=self.jpeg_draft)
        except ImageDecodeError as e:
            counter.skip("bad image")
            warn(f"skip {key} in {sample.get('__url__')}: {e}", "bad image")
            return None
        return {"image": image, **self.fields(texts, rng),
                "image_id": image_id_to_int(image_id if image_id is not None else key)}
