#!/usr/bin/env python
"""Annotations + image folder -> WebDataset tar shards with a manifest and a rejects list.

    python data_scripts/build_shards.py --format karpathy --annotations coco_karpathy_train.json \
        --images /data/coco --out /data/shards/coco_train --shard-size 1000 --workers 8

Caption formats: karpathy (COCO / Flickr30k Karpathy JSON), vg (vg_caption.json or region_descriptions.json),
jsonl, csv (columns image, caption[, image_id]), coco (COCO caption JSON).
Instruction formats (samples hold question/answer pairs; see blip2_train/data/annotations.py):
  instruct  JSONL, one {"image", "instruction", "answer", "image_id"?, "task"?} per line
  llava     LLaVA conversation JSON (llava_instruct_150k.json); --llava-turns first (the reference: the first
            question and answer) or all (one pair per answer, the earlier turns as context)
  vqa       VQAv2 / OK-VQA training files, given as --annotations QUESTIONS.json,ANNOTATIONS.json; images at
            --image-template (default COCO train2014)
  gqa       GQA train_balanced_questions.json; images <imageId>.jpg
  vg_qa     Visual Genome question_answers.json; images <image_id>.jpg (as --format vg)

    python data_scripts/build_shards.py --format vqa --images /data/coco \
        --annotations v2_OpenEnded_mscoco_train2014_questions.json,v2_mscoco_train2014_annotations.json \
        --out /data/shards/vqav2_train

Re-running into the same --out is incremental: the manifest records a fingerprint of each shard's records (image
paths, ids, captions or pairs) and of the options that change its bytes; a shard whose fingerprint still matches is
kept, one whose records changed (a fixed caption) is rebuilt, shards past the last one (fewer records) are removed,
and the manifest is rewritten to match. Image files edited in place are not seen: delete that shard's .tar to
rebuild it. Unreadable images and samples without captions or pairs are listed in rejects.jsonl and counted, never
dropped silently.
"""

import argparse
import os
import sys

from blip2_train.data.annotations import COCO_TRAIN2014, FORMATS, LLAVA_TURNS, PAIR_FORMATS, read_annotations
from blip2_train.data.shards import build_shards
from blip2_train.utils.errors import DataError


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True, help="root folder the annotation's image paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="shard")
    p.add_argument("--shard-size", type=int, default=1000, help="samples (images) per shard")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="decompression-bomb limit")
    p.add_argument("--llava-turns", choices=LLAVA_TURNS, default="first", help="llava: which turns become pairs")
    p.add_argument("--image-template", default=COCO_TRAIN2014, help="vqa: image path from {image_id}")
    a = p.parse_args()
    try:
        if a.shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, not {a.shard_size}")
        if not os.path.isdir(a.images):
            raise DataError(f"--images {a.images}: no such directory (every sample would be rejected)")
        records = read_annotations(a.annotations, a.format, llava_turns=a.llava_turns,
                                   image_template=a.image_template)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = build_shards(records, a.images, a.out, prefix=a.prefix, shard_size=a.shard_size, workers=a.workers,
                     source=f"{a.format}:{a.annotations}", max_pixels=a.max_pixels)
    b = m["build"]
    for why, names in b["reasons"].items():
        print(f"rebuilt {len(names)} shard(s), {why}: {_names(names)}")
    texts = f"{m['num_pairs']} pairs" if a.format in PAIR_FORMATS else f"{m['num_captions']} captions"
    print(f"{m['num_samples']} samples ({texts}) in {m['num_shards']} shards "
          f"({b['new']} new, {b['rebuilt']} rebuilt, {b['kept']} kept, {b['removed']} removed), "
          f"{m['num_rejected']} rejected (see {a.out}/rejects.jsonl)")


if __name__ == "__main__":
    main()
