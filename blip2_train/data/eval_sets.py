"""Map-style evaluation sets (Karpathy val/test): images and captions with their ids kept.

Built from a Karpathy annotation file + image root, or read from shards; both give the same object.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from blip2_train.data.annotations import read_annotations
from blip2_train.data.captions import as_caption_list, clean_caption
from blip2_train.data.transforms import EvalTransform, decode_image, image_errors, to_rgb, upright
from blip2_train.utils.errors import DataError


@dataclass
class CaptionedImages:
    """Images with all their captions: `texts[j]` belongs to image `txt2img[j]`; `img2txt[i]` lists j's."""

    image_ids: list[str]
    images: list  # paths (str) or encoded bytes
    texts: list[str] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    raw_captions: list[list[str]] = field(default_factory=list)  # uncleaned, for COCO-format ground truth
    domains: list[str] | None = None  # NoCaps: per-image domain, scored separately

    def add(self, image_id: str, image, captions: list[str], max_words: int) -> None:
        i = len(self.images)
        self.image_ids.append(str(image_id))
        self.images.append(image)
        self.raw_captions.append(list(captions))
        self.img2txt.append([])
        for c in captions:
            self.img2txt[i].append(len(self.texts))
            self.texts.append(clean_caption(c, max_words))
            self.txt2img.append(i)

    @classmethod
    def from_karpathy(cls, annotation: str | Path, image_root: str | Path, max_words: int = 50,
                      limit: int | None = None, fmt: str = "karpathy") -> "CaptionedImages":
        records = read_annotations(annotation, fmt)[:limit]
        out = cls(image_ids=[], images=[])
        for rec in records:
            if not rec.captions:
                raise DataError(f"{annotation}: image {rec.image} has no caption")
            out.add(rec.image_id, os.path.join(image_root, rec.image), rec.captions, max_words)
        if any(r.domain for r in records):
            out.domains = [str(r.domain) for r in records]
        return out

    @classmethod
    def from_shards(cls, urls: list[str], max_words: int = 50, limit: int | None = None) -> "CaptionedImages":
        out = cls(image_ids=[], images=[])
        for url in urls:
            with tarfile.open(url) as tar:
                members = {}
                for m in tar.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = m
                for key in sorted(members):
                    parts = members[key]
                    if "jpg" not in parts or "json" not in parts:
                        raise DataError(f"{url}: sample {key} lacks a .jpg or .json member")
                    meta = json.loads(tar.extractfile(parts["json"]).read())
                    caps = as_caption_list(meta.get("caption"))
                    if not caps:
                        raise DataError(f"{url}: sample {key}: field 'caption' is empty")
                    out.add(meta.get("image_id", key), tar.extractfile(parts["jpg"]).read(), caps, max_words)
                    if limit is not None and len(out.images) >= limit:
                        return out
        return out

    def __len__(self) -> int:
        return len(self.images)


class EvalImageDataset(Dataset):
    """Index -> (normalized image tensor, index); images decoded in the loader workers."""

    def __init__(self, data: CaptionedImages, image_size: int):
        self.data = data
        self.transform = EvalTransform(image_size)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return load_eval_image(self.data.images[i], self.transform, self.data.image_ids[i]), i


def load_eval_image(src, transform: EvalTransform, image_id=None, name: str | None = None) -> torch.Tensor:
    """A path, encoded bytes or a PIL image -> the normalised tensor evaluation sees (also what blip2-generate and
    the Python API feed the model: the same decoding, JPEG draft mode and EXIF orientation included).

    A missing or undecodable image is a DataError naming it: `name` when given (the message is then
    "<name>: <reason>"), else the path or the image id."""
    tag = f" (image_id {image_id})" if image_id is not None else ""
    kind = "PIL image" if isinstance(src, Image.Image) else "encoded bytes"
    where = f"{src}{tag}" if isinstance(src, (str, os.PathLike)) else f"image{tag} ({kind})"
    if isinstance(src, (str, os.PathLike)):
        if not os.path.isfile(src):
            reason = "is a folder, not an image file" if os.path.isdir(src) else "file not found"
            raise DataError(f"{name}: {reason}" if name else f"image file not found: {where}")
        try:
            with open(src, "rb") as f:
                src = f.read()
        except OSError as e:
            reason = f"cannot read the file ({e.strerror or e})"
            raise DataError(f"{name}: {reason}" if name else f"evaluation image {where}: {reason}") from e
    try:
        if isinstance(src, Image.Image):  # decoded by the caller: its pixels are read (or fail) here
            with image_errors(0):
                img = to_rgb(upright(src))  # before to_rgb: an RGBA image's flattening drops the tag
        else:
            img = decode_image(bytes(src), draft_size=transform.draft_size)
    except ValueError as e:
        raise DataError(f"{name}: {e}" if name else f"evaluation image {where}: {e}") from e
    return transform(img)


def collate_eval_images(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
