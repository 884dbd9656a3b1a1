#!/usr/bin/env python
"""Generate the synthetic captioned-shapes dataset, laid out as the real data (coco/, vg/, flickr30k/, nocaps/),
used by the demo, the tests and `preset=tiny`.

    python data_scripts/make_synthetic.py --out data/synthetic --num-train 3000 --num-val 100 --num-test 200 --seed 0
"""

import argparse

from blip2_train.data.synthetic import add_dataset_views, make_synthetic
from blip2_train.data.synthetic_vqa import write_vqa_sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    a = p.parse_args()
    paths = make_synthetic(a.out, a.num_train, a.num_val, a.num_test, a.seed, a.image_size)
    paths.update(add_dataset_views(a.out))
    paths.update(write_vqa_sets(a.out))  # vqav2/, okvqa/, gqa/ questions on the test split
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
