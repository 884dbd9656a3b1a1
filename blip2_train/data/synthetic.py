"""A synthetic captioned-shapes dataset in the COCO Karpathy layout, for learning checks without downloads.

Each image holds one or two coloured shapes in distinct quadrants; every caption names every shape's
colour, kind and quadrant, so a caption fully determines its image's content (retrieval and captioning are
learnable, and chance levels are known). Phrasings vary across an image's 1-5 captions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}

_SINGLE = (
    "a {c} {s} in the {p}",
    "there is a {c} {s} at the {p}",
    "a {c} {s} placed in the {p} corner",
    "the {p} shows a {c} {s}",
)
_JOIN = (" and ", " next to ", " with ")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_image(objects: list[tuple[str, str, str]], size: int, rng: random.Random) -> Image.Image:
    base = rng.randint(30, 70)
    img = Image.new("RGB", (size, size), (base, base, base))
    draw = ImageDraw.Draw(img)
    half = size // 2
    for color, shape, pos in objects:
        qx, qy = POSITIONS[pos]
        side = int(half * rng.uniform(0.55, 0.8))
        ox = qx * half + rng.randint(0, half - side)
        oy = qy * half + rng.randint(0, half - side)
        jitter = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[color])
        draw_shape(draw, shape, (ox, oy, ox + side, oy + side), jitter)
    return img


def describe(objects: list[tuple[str, str, str]], rng: random.Random) -> str:
    parts = [rng.choice(_SINGLE).format(c=c, s=s, p=p) for c, s, p in rng.sample(objects, len(objects))]
    return rng.choice(_JOIN).join(parts) if len(parts) > 1 else parts[0]


def sample_objects(rng: random.Random) -> list[tuple[str, str, str]]:
    n = rng.choice((1, 2))
    positions = rng.sample(list(POSITIONS), n)
    return [(rng.choice(list(COLORS)), rng.choice(SHAPES), p) for p in positions]


def make_synthetic(
    out: str | Path,
    num_train: int = 2000,
    num_val: int = 100,
    num_test: int = 100,
    seed: int = 0,
    image_size: int = 64,
    min_captions: int = 1,
    max_captions: int = 5,
) -> dict[str, Path]:
    """Write images + Karpathy-format annotations. Returns the annotation path of each split."""
    out = Path(out)
    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(n):
            objects = sample_objects(rng)
            image_rel = f"images/{split}/{split}_{i:06d}.jpg"
            make_image(objects, image_size, rng).save(out / image_rel, quality=95)
            captions = [describe(objects, rng) for _ in range(rng.randint(min_captions, max_captions))]
            image_id = f"{split}_{i:06d}"
            if split == "train":  # the Karpathy train layout: one entry per caption
                entries.extend({"image": image_rel, "caption": c, "image_id": image_id} for c in captions)
            else:
                entries.append({"image": image_rel, "caption": captions, "image_id": image_id})
        ann = out / "annotations" / f"coco_karpathy_{split}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(entries))
        paths[split] = ann
    return paths
