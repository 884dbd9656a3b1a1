#!/usr/bin/env python
"""Annotations + image folder -> WebDataset tar shards with a manifest and a rejects list.

    python data_scripts/build_shards.py --format karpathy --annotations coco_karpathy_train.json \
        --images /data/coco --out /data/shards/coco_train --shard-size 1000 --workers 8

Formats: karpathy (COCO / Flickr30k Karpathy JSON), vg (vg_caption.json or region_descriptions.json),
jsonl, csv (columns image, caption[, image_id]). Re-running resumes: complete shards are kept.
Unreadable images and samples without captions are listed in rejects.jsonl and counted, never dropped silently.
"""

import argparse
import sys

from blip2_train.data.annotations import FORMATS, read_annotations
from blip2_train.data.shards import build_shards
from blip2_train.utils.errors import DataError


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
    a = p.parse_args()
    try:
        records = read_annotations(a.annotations, a.format)
    except DataError as e:
        sys.exit(f"error: {e}")
    m = build_shards(records, a.images, a.out, prefix=a.prefix, shard_size=a.shard_size, workers=a.workers,
                     source=f"{a.format}:{a.annotations}", max_pixels=a.max_pixels)
    print(f"{m['num_samples']} samples ({m['num_captions']} captions) in {m['num_shards']} shards, "
          f"{m['num_rejected']} rejected (see {a.out}/rejects.jsonl)")


if __name__ == "__main__":
    main()
