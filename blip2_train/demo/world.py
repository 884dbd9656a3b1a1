"""A synthetic captioned-shapes dataset laid out as the real data is, for learning checks without downloads.

`make_synthetic` writes COCO Karpathy-style splits (`coco/images/<split>/`, `coco/annotations/coco_karpathy_*.json`);
`add_benchmark_views` adds the Flickr30k (`flickr30k/annotations/test.json`) and NoCaps (`nocaps/annotations/
nocaps_val_4500_captions.json`, COCO caption format with a per-image domain) views of the same images, so that the
shipped data configs and experiments run unchanged with `paths.data_dir` pointing here (`preset=tiny`).

Each image holds `min_objects`..`max_objects` coloured shapes in distinct quadrants; every caption names every
shape's colour, kind and quadrant, so a caption fully determines its image's content (retrieval and captioning
are learnable, and chance levels are known). Phrasings vary across an image's 1-5 captions. The defaults are
world 1 (one or two shapes, six colours: half the images are one of 72 single-shape contents, each shared with
~20 others); `make demo` draws one to three shapes from ten colours (docs/itm_at_tiny_size.md: fewer duplicate
contents, and rarer words for CIDEr). `make_synthetic.py` reports the duplicate-content rate. `scenes.json`
beside the annotations records every image's objects (what the VQA sets and the demo ViT stand-in read).
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
    # the first six are world 1's palette; `num_colors` draws from the first N (more colours: rarer words, a lower
    # image-blind captioning baseline, fewer duplicate contents: docs/itm_at_tiny_size.md)
    "pink": (250, 140, 200),
    "cyan": (50, 210, 220),
    "white": (235, 235, 235),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle")
# Bumped whenever what make_synthetic draws for the same arguments changes; recorded in world.json beside the
# arguments that tell worlds apart ("world": num_colors, min/max_objects). 1: scenes.json, the palette's first six
# colours unchanged by num_colors
WORLD_VERSION = 1


def add_world_arguments(parser) -> None:
    """The arguments that tell worlds apart (`world_of` reads them back): one owner for every data script."""
    parser.add_argument("--min-objects", type=int, default=1, choices=(1, 2, 3, 4))
    parser.add_argument("--max-objects", type=int, default=2, choices=(1, 2, 3, 4),
                        help="shapes per image, drawn uniformly in [min, max] (docs/itm_at_tiny_size.md)")
    parser.add_argument("--num-colors", type=int, default=6, choices=range(2, len(COLORS) + 1),
                        metavar=f"2..{len(COLORS)}", help="colours drawn from the first N of the palette (6: world 1)")


def world_of(args) -> dict:
    """The world that parsed `add_world_arguments` name, as world.json records it; an error line if impossible."""
    if args.min_objects > args.max_objects:
        raise ValueError(f"--min-objects {args.min_objects} is above --max-objects {args.max_objects}")
    return {"num_colors": args.num_colors, "min_objects": args.min_objects, "max_objects": args.max_objects}


def world_matches(data_dir: str | Path, world: dict) -> bool:
    """Whether `data_dir/world.json` records this world, drawn by this code's WORLD_VERSION."""
    try:
        recorded = json.loads((Path(data_dir) / "world.json").read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("world_version") == WORLD_VERSION and recorded.get("world") == world


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


def sample_objects(rng: random.Random, min_objects: int = 1, max_objects: int = 2,
                   num_colors: int = 6) -> list[tuple[str, str, str]]:
    n = rng.choice(tuple(range(min_objects, max_objects + 1)))  # (1, 2): the same draws as the worlds made before
    positions = rng.sample(list(POSITIONS), n)
    colors = list(COLORS)[:num_colors]
    return [(rng.choice(colors), rng.choice(SHAPES), p) for p in positions]


def make_synthetic(
    out: str | Path,
    num_train: int = 2000,
    num_val: int = 100,
    num_test: int = 100,
    seed: int = 0,
    image_size: int = 64,
    min_captions: int = 1,
    max_captions: int = 5,
    min_objects: int = 1,
    max_objects: int = 2,
    num_colors: int = 6,
) -> dict[str, Path]:
    """Write images + Karpathy-format annotations under `out/coco`. Returns the annotation path of each split;
    image paths in the annotations are relative to `image_root(out)`."""
    if not 2 <= num_colors <= len(COLORS):
        raise ValueError(f"num_colors={num_colors}: the palette has 2 to {len(COLORS)} colours")
    out = Path(out)
    rng = random.Random(seed)
    paths, scenes = {}, []
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        (image_root(out) / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for i in range(n):
            objects = sample_objects(rng, min_objects, max_objects, num_colors)
            image_rel = f"{split}/{split}_{i:06d}.jpg"
            make_image(objects, image_size, rng).save(image_root(out) / image_rel, quality=95)
            captions = [describe(objects, rng) for _ in range(rng.randint(min_captions, max_captions))]
            image_id = f"{split}_{i:06d}"
            scenes.append(scene_record(image_rel, image_id, split, objects))
            if split == "train":  # the Karpathy train layout: one entry per caption
                entries.extend({"image": image_rel, "caption": c, "image_id": image_id} for c in captions)
            else:
                entries.append({"image": image_rel, "caption": captions, "image_id": image_id})
        ann = out / "coco" / "annotations" / f"coco_karpathy_{split}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps(entries))
        paths[split] = ann
    paths["scenes"] = out / "coco" / "annotations" / "scenes.json"
    paths["scenes"].write_text(json.dumps(scenes))
    return paths


def scene_record(image: str, image_id: str, split: str, objects: list[tuple[str, str, str]]) -> dict:
    """What `world_vqa.read_scenes` reads: objects with their grid row / column. No caption: the demo LLM
    stand-in answers its text-only questions from the scene's words (train_demo_llm.py's `scene_words`); with the
    first caption as that context the image-blind captioning baseline came out at 84.3 CIDEr instead of 46.2, and
    the demo's CIDEr bar (3x) failed at 2.9x (docs/itm_at_tiny_size.md)."""
    return {"image": image, "image_id": image_id, "split": split, "background": None,
            "objects": [{"color": c, "shape": s, "size": None, "row": POSITIONS[p][1], "col": POSITIONS[p][0]}
                        for c, s, p in objects]}


def content_key(scene: dict) -> tuple:
    """What an image shows, up to drawing jitter: its (cell, colour, shape) triples."""
    return tuple(sorted((o["row"], o["col"], o["color"], o["shape"]) for o in scene["objects"]))


def world_report(scenes_path: str | Path) -> dict:
    """Per split: images, distinct contents, the share of images whose content another image of the split
    shares (the duplicate-content rate), and the chance level of text->image R@1 (100 / images)."""
    from collections import Counter

    scenes = json.loads(Path(scenes_path).read_text())
    report = {}
    for split in ("train", "val", "test"):
        keys = Counter(content_key(s) for s in scenes if s["split"] == split)
        n = sum(keys.values())
        if n:
            report[split] = {"images": n, "contents": len(keys),
                             "duplicate_content_rate": sum(c for c in keys.values() if c > 1) / n,
                             "chance_text_to_image_r1": 100.0 / n}
    return report


def image_root(out: str | Path) -> Path:
    return Path(out) / "coco" / "images"


def add_dataset_views(out: str | Path, vg_fraction: float = 1 / 3) -> dict[str, Path]:
    """The other datasets of the real layout, from the synthetic splits:
    - Visual Genome (`vg/annotations/vg_caption.json`): the last `vg_fraction` of the train images, taken out of
      the COCO train split, so that the two pretraining sources are disjoint as COCO and VG mostly are;
    - Flickr30k test = the synthetic test split;
    - NoCaps val = the val split in COCO caption format, with the domain named by the scene:
      one shape: in-domain; two of one colour: near-domain; else out-domain).
    Flickr30k, NoCaps and VG read the COCO images through relative symlinks."""
    out = Path(out)
    views = {}
    coco_train = out / "coco" / "annotations" / "coco_karpathy_train.json"
    entries = json.loads(coco_train.read_text())
    ids = list(dict.fromkeys(e["image_id"] for e in entries))
    vg_ids = set(ids[len(ids) - int(len(ids) * vg_fraction):])
    vg = out / "vg" / "annotations" / "vg_caption.json"
    vg.parent.mkdir(parents=True, exist_ok=True)
    vg.write_text(json.dumps([e for e in entries if e["image_id"] in vg_ids]))
    coco_train.write_text(json.dumps([e for e in entries if e["image_id"] not in vg_ids]))
    views["vg"] = vg
    for name in ("vg", "flickr30k", "nocaps"):
        link = out / name / "images"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path("..") / "coco" / "images", target_is_directory=True)
    for name in ("flickr30k", "nocaps"):
        link = out / name / "images"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(Path("..") / "coco" / "images", target_is_directory=True)
    flickr = out / "flickr30k" / "annotations" / "test.json"
    flickr.parent.mkdir(parents=True, exist_ok=True)
    flickr.write_text((out / "coco" / "annotations" / "coco_karpathy_test.json").read_text())
    views["flickr30k"] = flickr
    val = json.loads((out / "coco" / "annotations" / "coco_karpathy_val.json").read_text())
    scenes = {s["image"]: s for s in json.loads((out / "coco" / "annotations" / "scenes.json").read_text())}
    images, annotations = [], []
    for n, entry in enumerate(val):
        caps = entry["caption"]
        objects = scenes[entry["image"]]["objects"]
        colours = {o["color"] for o in objects}
        domain = "in-domain" if len(objects) == 1 else ("near-domain" if len(colours) == 1 else "out-domain")
        images.append({"id": n, "file_name": entry["image"], "domain": domain})
        annotations.extend({"image_id": n, "id": len(annotations), "caption": c} for c in caps)
    nocaps = out / "nocaps" / "annotations" / "nocaps_val_4500_captions.json"
    nocaps.parent.mkdir(parents=True, exist_ok=True)
    nocaps.write_text(json.dumps({"images": images, "annotations": annotations}))
    views["nocaps"] = nocaps
    return views


def write_classify_folder(out: str | Path, by: str = "color", per_class: int = 10, seed: int = 0,
                          image_size: int = 32, num_colors: int = 6) -> Path:
    """A zero-shot classification set in the image-folder layout, `out/<class>/<i>.jpg`: single-shape scenes of
    the world, classed by the shape's colour (`by="color"`: the palette's first `num_colors`) or its kind
    (`by="shape"`), the other attributes and the quadrant drawn at random. Returns `out`."""
    if by not in ("color", "shape"):
        raise ValueError(f"by={by!r}: 'color' or 'shape'")
    out = Path(out)
    rng = random.Random(seed)
    colors = list(COLORS)[:num_colors]
    classes = colors if by == "color" else list(SHAPES)
    for name in classes:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color = name if by == "color" else rng.choice(colors)
            shape = name if by == "shape" else rng.choice(SHAPES)
            objects = [(color, shape, rng.choice(list(POSITIONS)))]
            make_image(objects, image_size, rng).save(out / name / f"{i:04d}.jpg", quality=95)
    return out
