#!/usr/bin/env python
"""Generate the synthetic captioned-shapes dataset, laid out as the real data (coco/, vg/, flickr30k/, nocaps/),
used by the demo, the tests and `preset=tiny`.

    python data_scripts/make_synthetic.py --out data/my_world --num-train 3000 --num-val 100 --num-test 200 --seed 0

(world 1; `make demo`'s world, which run_scripts/prepare_synthetic.sh makes under data/synthetic, adds
--num-colors 10 --min-objects 1 --max-objects 3: a data/synthetic of another world is made again there)
"""

import argparse
import json
import sys
from pathlib import Path

from blip2_train.demo.world import (WORLD_VERSION, add_dataset_views, add_world_arguments, make_synthetic,
                                        world_matches, world_of, world_report)
from blip2_train.demo.world_vqa import DEMO_HELD_OUT, write_vg_qa, write_vqa_sets, write_vqa_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--matches", metavar="DIR", help="draw nothing: exit 0 if DIR/world.json records the world these "
                   "arguments name (and this code's world version), 1 if not (what prepare_synthetic.sh checks)")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    add_world_arguments(p)
    a = p.parse_args()
    try:
        world = world_of(a)
    except ValueError as e:
        p.error(str(e))
    if a.matches:
        sys.exit(0 if world_matches(a.matches, world) else 1)
    if not a.out:
        p.error("--out is required (or --matches DIR)")
    if min(a.num_train, a.num_val, a.num_test) < 1:  # every split is read: stand-ins train on train, evals on test
        p.error("--num-train/--num-val/--num-test must each be at least 1 "
                f"(got {a.num_train}/{a.num_val}/{a.num_test})")
    if Path(a.out).exists() and any(Path(a.out).iterdir()):
        # shards/, bert/, vit/ and llm/ of another world would stay beside the new images and annotations
        p.error(f"--out {a.out} is not empty: give a new directory (run_scripts/prepare_synthetic.sh makes it again)")
    paths = make_synthetic(a.out, a.num_train, a.num_val, a.num_test, a.seed, a.image_size,
                           min_objects=a.min_objects, max_objects=a.max_objects, num_colors=a.num_colors)
    paths.update(add_dataset_views(a.out))
    paths.update(write_vqa_sets(a.out))  # vqav2/, okvqa/, gqa/ questions on the test split
    # VQAv2-format training questions on the train split (instruction tuning), one question kind held out
    paths["vqav2_train"] = write_vqa_train(a.out, exclude_types=DEMO_HELD_OUT)[0]
    paths["vg_qa"] = write_vg_qa(a.out)  # Visual Genome QA's layout on the VG view's images
    for split, path in paths.items():
        print(f"{split}: {path}")
    report = world_report(paths["scenes"])
    # what --matches (prepare_synthetic.sh) checks before it keeps an existing data directory
    (Path(a.out) / "world.json").write_text(json.dumps({"world_version": WORLD_VERSION, "world": world,
                                                        "splits": report}, indent=1))
    for split, r in report.items():
        print(f"{split}: {r['images']} images, {r['contents']} distinct contents, duplicate-content rate "
              f"{r['duplicate_content_rate']:.1%}, chance text->image R@1 {r['chance_text_to_image_r1']:.2f}%")


if __name__ == "__main__":
    main()
