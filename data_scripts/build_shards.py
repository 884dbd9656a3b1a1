#!/usr/bin/env python
"""Annotations + image folder -> WebDataset tar shards with a manifest and a rejects list.

    python data_scripts/build_shards.py --format karpathy --annotations coco_karpathy_train.json \
        --images /data/coco --out /data/shards/coco_train --shard-size 1000 --workers 8

Formats: karpathy (COCO / Flickr30k Karpathy JSON), vg (vg_caption.json or region_descriptions.json),
jsonl, csv (columns image, caption[, image_id]), coco (COCO caption JSON).
Re-running into the same --out is incremental: the manifest records a fingerprint of each shard's records (image
paths, ids, captions) and of the options that change its bytes; a shard whose fingerprint still matches is kept,
one whose records changed (a fixed caption) is rebuilt, shards past the last one (fewer records) are removed, and
the manifest is rewritten to match. Image files edited in place are not seen: delete that shard's .tar to rebuild it.
Unreadable images and samples without captions are listed in rejects.jsonl and counted, never dropped silently.
"""

import argparse
import os
import sys

from blip2_train.data.annotations import FORMATS, read_annotations
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
    a = p.parse_args()
    try:
        if a.shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, not {a.shard_size}")
        if not os.path.isdir(a.images):
            raise DataError(f"--images {a.images}: no such directory (every sample would be rejected)")
        records = read_annotations(a.annotations, a.format)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    m = build_shards(records, a.images, a.out, prefix=a.prefix, shard_size=a.shard_size, workers=a.workers,
                     source=f"{a.format}:{a.annotations}", max_pixels=a.max_pixels)
    b = m["build"]
    for why, names in b["reasons"].items():
        print(f"rebuilt {len(names)} shard(s), {why}: {_names(names)}")
    print(f"{m['num_samples']} samples ({m['num_captions']} captions) in {m['num_shards']} shards "
          f"({b['new']} new, {b['rebuilt']} rebuilt, {b['kept']} kept, {b['removed']} removed), "
          f"{m['num_rejected']} rejected (see {a.out}/rejects.jsonl)")


if __name__ == "__main__":
    main()
