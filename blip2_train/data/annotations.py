"""Annotation readers: every supported format -> a list of `ImageRecord` (one per image, all its captions).

Formats
- `karpathy`: the COCO / Flickr30k Karpathy JSON the reference uses: a list of `{image, caption, image_id?}`
  where `caption` is a string (train files: one entry per caption) or a list (val/test files).
- `vg`: Visual Genome, either the reference's `vg_caption.json` (Karpathy-like) or the raw
  `region_descriptions.json` (`[{id, regions: [{image_id, phrase}]}]`; images at `<image_id>.jpg`).
- `jsonl` / `csv`: generic files with `image` and `caption` columns (`image_id` optional).
- `coco`: a COCO caption annotation file (`{images: [{id, file_name, domain?}], annotations: [{image_id,
  caption}]}`), e.g. NoCaps val (`nocaps_val_4500_captions.json`, whose images carry in/near/out `domain`).
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from blip2_train.data.captions import as_caption_list
from blip2_train.utils.errors import DataError

FORMATS = ("karpathy", "vg", "jsonl", "csv", "coco")


@dataclass
class ImageRecord:
    image: str  # path relative to the image root
    image_id: str
    captions: list[str] = field(default_factory=list)
    domain: str | None = None  # NoCaps: in-domain / near-domain / out-domain


def _group(entries, path: Path) -> list[ImageRecord]:
    """Merge entries of the same image (train files repeat the image once per caption), keeping order."""
    by_image: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object with 'image' and 'caption'")
        if "image" not in entry:
            raise DataError(f"{path}: entry {i} has no 'image' field")
        image = str(entry["image"])
        caps = as_caption_list(entry.get("caption"))
        if "caption" in entry and not caps and entry["caption"] not in ("", None, []):
            raise DataError(f"{path}: entry {i} ({image}): field 'caption' must be a string or a list of strings")
        image_id = str(entry.get("image_id", Path(image).stem))
        rec = by_image.get(image)
        if rec is None:
            rec = by_image[image] = ImageRecord(image=image, image_id=image_id)
        rec.captions.extend(caps)
    return list(by_image.values())


def _load_json(path: Path):
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def read_karpathy(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if isinstance(data, dict) and "images" in data:  # the original Karpathy dataset_coco.json layout
        entries = []
        for i, img in enumerate(data["images"] if isinstance(data["images"], list) else [data["images"]]):
            if not isinstance(img, dict) or "filename" not in img:
                hint = " (this looks like a COCO caption file: use format=coco)" if isinstance(img, dict) and \
                    "file_name" in img else ""
                raise DataError(f"{path}: images[{i}] has no 'filename' field: expected a list of {{image, caption}} "
                                f"objects or the Karpathy dataset_*.json layout{hint}")
            image = f"{img['filepath']}/{img['filename']}" if "filepath" in img else img["filename"]
            caps = [s["raw"] for s in img.get("sentences", [])]
            entries.append({"image": image, "caption": caps, "image_id": img.get("cocoid", img.get("imgid"))})
        data = entries
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{image, caption}} objects, got a {type(data).__name__}")
    return _group(data, path)


def read_visual_genome(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        records = []
        for i, item in enumerate(data):
            regions = item.get("regions") or []
            if not regions:
                continue
            image_id = str(regions[0].get("image_id", item.get("id", i)))
            caps = [r["phrase"] for r in regions if isinstance(r.get("phrase"), str)]
            records.append(ImageRecord(image=f"{image_id}.jpg", image_id=image_id, captions=caps))
        return records
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list (vg_caption.json or region_descriptions.json)")
    return _group(data, path)


def read_jsonl(path: Path) -> list[ImageRecord]:
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e
    return _group(entries, path)


def read_csv(path: Path) -> list[ImageRecord]:
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
        return _group(list(reader), path)


def read_coco_captions(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a COCO caption file, an object with an 'images' list and an 'annotations' list")
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        records[str(img["id"])] = ImageRecord(image=img["file_name"], image_id=str(img["id"]), domain=img.get("domain"))
    for j, ann in enumerate(data.get("annotations") or []):
        rec = records.get(str(ann.get("image_id"))) if isinstance(ann, dict) else None
        if rec is None:
            raise DataError(f"{path}: annotations[{j}] refers to image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r}, "
                            "which is not in 'images'")
        rec.captions.extend(as_caption_list(ann.get("caption")))
    return list(records.values())


def read_annotations(path: str | Path, fmt: str) -> list[ImageRecord]:
    path = Path(path)
    readers = {"karpathy": read_karpathy, "vg": read_visual_genome, "jsonl": read_jsonl, "csv": read_csv,
               "coco": read_coco_captions}
    if fmt not in readers:
        raise DataError(f"unknown annotation format {fmt!r}; expected one of {FORMATS}")
    return readers[fmt](path)
