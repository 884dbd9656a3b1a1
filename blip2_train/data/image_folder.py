"""Labelled image sets for zero-shot classification: an image folder `root/<class>/<image>` or a CSV `image,label`.

Class names are what the prompts are filled with: a folder name (or CSV label) with `_` read as a space
("golden_retriever" -> "golden retriever"), unless a `classes.txt` maps it. `classes.txt` holds one class a line,
`<folder or label> <class name>`, split at the first whitespace: ImageNet's `LOC_synset_mapping.txt` works as it is
("n01440764 tench, Tinca tinca"). Every class in the set is a candidate label, in sorted folder / label order.

An image that cannot be decoded is not an error here: `LabelledImageDataset` marks it, and the evaluation counts
and names it (a real folder of 50k photos holds a few broken ones; one should not end the run).
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from blip2_train.data.transforms import EvalTransform
from blip2_train.utils.errors import ConfigError, DataError

IMAGE_SET_FORMATS = ("image_folder", "image_csv")
CLASSES_FILE = "classes.txt"


@dataclass
class LabelledImages:
    """`images[i]` (a path) shows class `labels[i]`, an index into `classes` (the names prompts are filled with);
    `image_ids[i]` names it in logs and predictions (its path relative to the set's root)."""

    classes: list[str]
    images: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    source: str = ""  # where the set was read from, for messages

    def __len__(self) -> int:
        return len(self.images)


@functools.lru_cache(maxsize=1)
@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Every extension PIL has a decoder for (.jpg .png .gif .tiff .webp .bmp ...): what PIL opens when a
    file is named on its own, it opens in a folder too (blip2-generate, blip2-embed, class folders). Left out:
    formats PIL only identifies (its stubs for HDF5, GRIB, BUFR, WMF need a handler installed; MPEG has no
    decoder), which would fail on every file."""
    from PIL import Image, ImageFile

    def decodes(fmt: str) -> bool:
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt == "MPEG":
            return False
        return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))

    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt))


def class_name(key: str) -> str:
    return key.replace("_", " ").strip()


def read_class_map(path: str | Path) -> dict[str, str]:
    """`classes.txt`: `<folder or label> <class name>` a line -> {folder: name}; DataError naming file:line."""
    out: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            raise DataError(f"{path}:{n}: expected '<folder or label> <class name>', got {line.strip()!r}")
        if parts[0] in out:
            raise DataError(f"{path}:{n}: {parts[0]!r} is mapped twice")
        out[parts[0]] = parts[1].strip()
    return out


def name_classes(keys: list[str], mapping: dict[str, str] | None, source: str) -> list[str]:
    """Folder names / CSV labels -> class names; two keys with one name would be one class told apart by nothing."""
    if mapping is not None:
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise DataError(f"{source}: {len(missing)} class(es) not in its class map: {', '.join(missing[:10])}")
    names = [mapping[k] if mapping is not None else class_name(k) for k in keys]
    seen: dict[str, str] = {}
    for k, name in zip(keys, names):
        if not name:
            raise DataError(f"{source}: class {k!r} has an empty name")
        if name in seen:
            raise DataError(f"{source}: classes {seen[name]!r} and {k!r} are both named {name!r}")
        seen[name] = k
    return names


def _class_map(root: Path, classes_file: str | Path | None) -> dict[str, str] | None:
    if classes_file:
        if not Path(classes_file).is_file():
            raise DataError(f"class map not found: {classes_file} (data.eval_set.classes_file)")
        return read_class_map(classes_file)
    default = root / CLASSES_FILE
    return read_class_map(default) if default.is_file() else None


def read_image_folder(root: str | Path, classes_file: str | Path | None = None,
                      limit: int | None = None) -> LabelledImages:
    """`root/<class>/<image>` (images found recursively under each class folder, sorted); files that are not
    images by their extension, and hidden ones, are left out. `limit`: the first N images (smoke runs)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (data.eval_set.image_root: root/<class>/<image>)")
    keys = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not keys:
        raise DataError(f"{root}: no class folders (expected root/<class>/<image>)")
    mapping = _class_map(root, classes_file)
    out = LabelledImages(classes=name_classes(keys, mapping, str(root)), source=str(root))
    exts = image_extensions()
    for label, key in enumerate(keys):
        files = sorted(f for f in (root / key).rglob("*") if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in exts)
        for f in files:
            out.images.append(str(f))
            out.labels.append(label)
            out.image_ids.append(str(f.relative_to(root)))
    if not out.images:
        raise DataError(f"{root}: no images in its {len(keys)} class folder(s) (extensions PIL decodes, e.g. .jpg "
                        ".png)")
    return _limited(out, limit)


def read_image_csv(path: str | Path, image_root: str | Path | None = None, classes_file: str | Path | None = None,
                   limit: int | None = None) -> LabelledImages:
    """A CSV with header `image,label`: image paths relative to `image_root` (default: the CSV's folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file not found: {path} (data.eval_set.annotation)")
    root = Path(image_root) if image_root else path.parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected a header 'image,label', got {','.join(reader.fieldnames or [])!r}")
        rows = []
        for n, row in enumerate(reader, 2):
            image, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
            if not image or not label:
                raise DataError(f"{path}:{n}: field '{'image' if not image else 'label'}' is empty")
            rows.append((image, label))
    if not rows:
        raise DataError(f"{path}: no images in this file (a row per image: image,label)")
    keys = sorted({label for _, label in rows})
    mapping = _class_map(root, classes_file)
    out = LabelledImages(classes=name_classes(keys, mapping, str(path)), source=str(path))
    index = {k: i for i, k in enumerate(keys)}
    for image, label in rows:
        out.images.append(str(root / image))
        out.labels.append(index[label])
        out.image_ids.append(image)
    return _limited(out, limit)


def _limited(data: LabelledImages, limit: int | None) -> LabelledImages:
    if limit is not None:
        data.images, data.labels, data.image_ids = data.images[:limit], data.labels[:limit], data.image_ids[:limit]
    return data


def read_labelled_images(cfg: dict) -> LabelledImages:
    """`data.eval_set` -> the set: format image_folder (`image_root`) or image_csv (`annotation`, `image_root`),
    `classes_file` (optional), `limit`."""
    fmt = cfg.get("format")
    if fmt == "image_folder":
        if not cfg.get("image_root"):
            raise ConfigError("data.eval_set.image_root is required with data.eval_set.format=image_folder")
        return read_image_folder(cfg["image_root"], cfg.get("classes_file"), cfg.get("limit"))
    if fmt == "image_csv":
        if not cfg.get("annotation"):
            raise ConfigError("data.eval_set.annotation (the image,label CSV) is required with "
                              "data.eval_set.format=image_csv")
        return read_image_csv(cfg["annotation"], cfg.get("image_root"), cfg.get("classes_file"), cfg.get("limit"))
    raise ConfigError(f"data.eval_set.format={fmt!r}: zero-shot classification reads {list(IMAGE_SET_FORMATS)} "
                      "(e.g. data=imagefolder_eval)")


class LabelledImageDataset(Dataset):
    """Index -> (normalised image, index, why it cannot be read or ""): an unreadable image gives zeros and the
    reason, so that the evaluation counts and names it instead of ending (in a loader worker, an exception would)."""

    def __init__(self, data: LabelledImages, image_size: int):
        self.data = data
        self.transform = EvalTransform(image_size)
        self.size = image_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        from blip2_train.data.eval_sets import load_eval_image

        try:
            return load_eval_image(self.data.images[i], self.transform, name=self.data.image_ids[i]), i, ""
        except DataError as e:
            return torch.zeros(3, self.size, self.size), i, str(e)


def collate_labelled(batch):
    """-> (images [B, 3, H, W], indices [B], reasons: "" for a readable image)."""
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch]), [b[2] for b in batch]


def labelled_image_loader(data: LabelledImages, image_size: int, batch_size: int, num_workers: int,
                          rank: int = 0, world_size: int = 1):
    """This rank's contiguous share of the images (predictions are gathered in rank order afterwards)."""
    from torch.utils.data import DataLoader, Subset

    from blip2_train.distributed.collectives import shard_range

    lo, hi = shard_range(len(data), rank, world_size)
    return DataLoader(Subset(LabelledImageDataset(data, image_size), range(lo, hi)), batch_size=batch_size,
                      num_workers=min(num_workers, 2), collate_fn=collate_labelled)
