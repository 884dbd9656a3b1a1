"""Caption cleaning as the reference does it (LAVIS `BlipCaptionProcessor.pre_caption`)."""

from __future__ import annotations

import random
import re
from typing import Sequence

_STRIP_CHARS = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 50) -> str:
    """Lowercase, drop `.!"()*#:;~`, turn '-' and '/' into spaces, collapse spaces, keep `max_words` words.

    No prompt here: the stage-2 collator puts `model.text.prompt` before the caption and masks it.
    """
    caption = _STRIP_CHARS.sub(" ", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def as_caption_list(value) -> list[str]:
    """A `caption` field may be one string or a list of strings (CapFilt keeps several per image)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [c for c in value if isinstance(c, str)]
    return []


def pick_caption(captions: Sequence[str], rng: random.Random) -> str:
    """CapFilt-style: one caption of the image's list, drawn anew at every step."""
    return captions[0] if len(captions) == 1 else captions[rng.randrange(len(captions))]
