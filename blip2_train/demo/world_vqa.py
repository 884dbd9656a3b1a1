"""Questions about the synthetic world's scenes, written in the official formats so the shipped VQA experiments run
unchanged on it (`preset=tiny`): `vqav2/` and `okvqa/` (question + annotation JSON, 10 human answers per question,
COCO-style image names) and `gqa/` (testdev_balanced_questions.json, one answer).

Questions ask about colour, shape, position, count and presence; every answer is read off the scene, so a model
that sees the image can answer them and the image-blind baseline (same model, blank images) cannot beyond its
priors. Ten "human" answers per question: each is the truth, or with probability `noise` another answer of the same
kind, so the leave-one-out accuracy has something to average.

    python -m blip2_train.demo.world_vqa --data-dir data/synthetic --split test
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from pathlib import Path

from blip2_train.data.vqa import COCO_VAL2014
from blip2_train.utils.errors import DataError

# Where the official files go under the data directory (what conf/data/{vqav2,okvqa,gqa}_eval.yaml read).
VQA_FILES = {"vqav2": ("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"),
             "okvqa": ("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")}
GQA_FILE = "testdev_balanced_questions.json"


def cell_name(row: int, col: int, grid: int) -> str:
    """(row, col) of a grid x grid layout -> "top left", "middle right", "center", ..."""
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "middle", "right")
    if grid == 3 and (row, col) == (1, 1):
        return "center"
    return f"{rows[row]} {cols[col]}"


def read_scenes(data_dir: str | Path, split: str) -> list[dict]:
    """The split's scenes, from `coco/annotations/scenes.json` (what make_synthetic.py writes)."""
    path = Path(data_dir) / "coco" / "annotations" / "scenes.json"
    if not path.exists():
        raise DataError(f"no {path}: make the synthetic world with data_scripts/make_synthetic.py")
    return [s for s in json.loads(path.read_text()) if s["split"] == split]


def scene_questions(scene: dict, grid: int, colors: list[str], shapes: list[str], rng: random.Random) -> list[dict]:
    """Every question the scene answers: {question, answer, question_type, answer_type, pool (wrong answers)}."""
    objs = scene["objects"]
    cells = [cell_name(o["row"], o["col"], grid) for o in objs]
    all_cells = sorted({cell_name(r, c, grid) for r in range(grid) for c in range(grid)})
    shape_n = Counter(o["shape"] for o in objs)
    kind_n = Counter((o["color"], o["shape"]) for o in objs)
    out = [{"question": "how many shapes are there?", "answer": str(len(objs)), "question_type": "how many",
            "answer_type": "number", "pool": [str(n) for n in range(1, 6)]}]
    for o, cell in zip(objs, cells):
        if shape_n[o["shape"]] == 1:
            out.append({"question": f"what color is the {o['shape']}?", "answer": o["color"],
                        "question_type": "what color is the", "answer_type": "other", "pool": colors})
        out.append({"question": f"what shape is in the {cell}?", "answer": o["shape"],
                    "question_type": "what shape is", "answer_type": "other", "pool": shapes})
        if kind_n[(o["color"], o["shape"])] == 1:
            out.append({"question": f"where is the {o['color']} {o['shape']}?", "answer": cell,
                        "question_type": "where is the", "answer_type": "other", "pool": all_cells})
    if scene.get("background"):
        out.append({"question": "what color is the background?", "answer": scene["background"],
                    "question_type": "what color is the", "answer_type": "other",
                    "pool": ["black", "gray", "white", "brown"]})
    present = rng.random() < 0.5
    if present:
        o = rng.choice(objs)
        color, shape = o["color"], o["shape"]
    else:
        absent = [(c, s) for c in colors for s in shapes if (c, s) not in kind_n]
        color, shape = rng.choice(absent)
    out.append({"question": f"is there a {color} {shape}?", "answer": "yes" if present else "no",
                "question_type": "is there a", "answer_type": "yes/no", "pool": ["yes", "no"]})
    return out


def human_answers(truth: str, pool: list[str], rng: random.Random, noise: float) -> list[str]:
    return [truth if rng.random() >= noise else rng.choice([p for p in pool if p != truth] or [truth])
            for _ in range(10)]


def grid_size(scenes: list[dict]) -> int:
    """The side of the scenes' grid (2 or 3): the largest row / column any object sits in, at least 2x2."""
    return max(2, 1 + max(max(o["row"], o["col"]) for s in scenes for o in s["objects"]))


def build_questions(scenes: list[dict], per_image: int = 3, noise: float = 0.1, seed: int = 0) -> list[dict]:
    """-> [{question_id, image_index, question, answers (10), question_type, answer_type}], `per_image` per scene."""
    rng = random.Random(seed)
    grid = grid_size(scenes)
    colors = sorted({o["color"] for s in scenes for o in s["objects"]})
    shapes = sorted({o["shape"] for s in scenes for o in s["objects"]})
    out = []
    for n, scene in enumerate(scenes):
        candidates = scene_questions(scene, grid, colors, shapes, rng)
        for q in rng.sample(candidates, min(per_image, len(candidates))):
            out.append({"question_id": len(out) + 1, "image_index": n, "question": q["question"],
                        "answers": human_answers(q["answer"], q["pool"], rng, noise),
                        "question_type": q["question_type"], "answer_type": q["answer_type"]})
    return out


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(target, link.parent))


# The VQAv2 training files (what experiment=vqa_vqav2_ft and instruct_tune build shards from).
VQA_TRAIN_FILES = ("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json")
COCO_TRAIN2014 = "train2014/COCO_train2014_{image_id:012d}.jpg"


def write_vqa_files(data_dir: Path, name: str, files: tuple[str, str], image_template: str, scenes: list[dict],
                    qs: list[dict], subtype: str) -> Path:
    """One VQAv2-format view: image links named by `image_template`, the question and annotation files."""
    for n, s in enumerate(scenes):
        _link(data_dir / name / "images" / image_template.format(image_id=n), data_dir / "coco" / "images" / s["image"])
    ann_dir = data_dir / name / "annotations"
    questions = [{"question_id": q["question_id"], "image_id": q["image_index"], "question": q["question"]}
                 for q in qs]
    annotations = [{"question_id": q["question_id"], "image_id": q["image_index"],
                    "question_type": q["question_type"], "answer_type": q["answer_type"],
                    "multiple_choice_answer": Counter(q["answers"]).most_common(1)[0][0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, a in enumerate(q["answers"])]} for q in qs]
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / files[0]).write_text(json.dumps({"questions": questions, "data_subtype": subtype}))
    (ann_dir / files[1]).write_text(json.dumps({"annotations": annotations, "data_subtype": subtype}))
    return ann_dir / files[0]


# The question kind the demo's instruction tuning never trains on (its held-out template): make demo reports how
# the instruction-tuned model answers it zero-shot.
DEMO_HELD_OUT = ("what shape is",)


def write_vqa_train(data_dir: str | Path, per_image: int = 3, noise: float = 0.1, seed: int = 1,
                    exclude_types: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """VQAv2-format training files over the train scenes (vqav2/annotations/v2_*_train2014_*.json, images at
    vqav2/images/train2014/...), without the question types `exclude_types`. -> (questions, annotations file)."""
    data_dir = Path(data_dir)
    scenes = read_scenes(data_dir, "train")
    qs = [q for q in build_questions(scenes, per_image, noise, seed) if q["question_type"] not in exclude_types]
    q = write_vqa_files(data_dir, "vqav2", VQA_TRAIN_FILES, COCO_TRAIN2014, scenes, qs, "train2014")
    return q, q.parent / VQA_TRAIN_FILES[1]


def write_vg_qa(data_dir: str | Path, per_image: int = 2, seed: int = 2) -> Path:
    """Visual Genome QA's layout (`vg/annotations/question_answers.json`: `[{id, qas: [{qa_id, image_id, question,
    answer}]}]`, one answer a question, written as VG writes them: "Top left.") over the VG view's images (the
    train images of vg_caption.json), linked as `vg/qa_images/<image_id>.jpg`. -> the file."""
    data_dir = Path(data_dir)
    vg_images = {e["image"] for e in json.loads((data_dir / "vg" / "annotations" / "vg_caption.json").read_text())}
    scenes = [s for s in read_scenes(data_dir, "train") if s["image"] in vg_images]
    entries = []
    for q in build_questions(scenes, per_image, noise=0.0, seed=seed):
        n = q["image_index"]
        if not entries or entries[-1]["id"] != n:
            _link(data_dir / "vg" / "qa_images" / f"{n}.jpg", data_dir / "coco" / "images" / scenes[n]["image"])
            entries.append({"id": n, "qas": []})
        entries[-1]["qas"].append({"qa_id": q["question_id"], "image_id": n, "question": q["question"].capitalize(),
                                   "answer": q["answers"][0].capitalize() + "."})
    path = data_dir / "vg" / "annotations" / "question_answers.json"
    path.write_text(json.dumps(entries))
    return path


def write_vqa_sets(data_dir: str | Path, split: str = "test", per_image: int = 3, noise: float = 0.1,
                   seed: int = 0) -> dict[str, Path]:
    """Write the VQAv2 / OK-VQA / GQA views of `split` under `data_dir`. Images are relative links to the
    COCO images, named as each dataset names them. Returns the question file of each view."""
    data_dir = Path(data_dir)
    scenes = read_scenes(data_dir, split)
    qs = build_questions(scenes, per_image, noise, seed)
    paths = {}
    for name, files in VQA_FILES.items():
        paths[name] = write_vqa_files(data_dir, name, files, COCO_VAL2014, scenes, qs, "val2014")
    gqa = {}
    for n, s in enumerate(scenes):
        _link(data_dir / "gqa" / "images" / f"syn{n}.jpg", data_dir / "coco" / "images" / s["image"])
    for q in qs:  # GQA has one answer: the truth (the majority of the ten)
        gqa[str(q["question_id"])] = {"imageId": f"syn{q['image_index']}", "question": q["question"],
                                      "answer": Counter(q["answers"]).most_common(1)[0][0],
                                      "types": {"structural": "verify" if q["answer_type"] == "yes/no" else "query",
                                                "detailed": q["question_type"]}}
    (data_dir / "gqa" / "annotations").mkdir(parents=True, exist_ok=True)
    (data_dir / "gqa" / "annotations" / GQA_FILE).write_text(json.dumps(gqa))
    paths["gqa"] = data_dir / "gqa" / "annotations" / GQA_FILE
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--per-image", type=int, default=3)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, path in write_vqa_sets(a.data_dir, a.split, a.per_image, a.noise, a.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
