#!/usr/bin/env python
"""How far above an image-blind captioner a perfect one can score in a synthetic world, before any training.

CIDEr weighs n-grams by their rarity across the test images' references, so the words every caption shares
(phrasings, joins, the four quadrants) earn an image-blind model as much as a seeing one. For a world of
`make_synthetic.py`, this scores, with the captioning evaluation's own CIDEr (pycocoevalcap) on `--images` test
images drawn as `make_synthetic` draws them:
- blind: the best of `--candidates` fixed captions (one caption for every image, as a model that ignores its
  image would give): a strong image-blind reference (a fixed caption outside the sample may score higher);
- perfect: a fresh caption of each image's true content (another phrasing and object order);
- right colours and shapes in quadrants drawn anew (some land right), and right colours only (shapes drawn anew
  too).

    python data_scripts/caption_ceiling.py --num-colors 6 --min-objects 2 --max-objects 3
    python data_scripts/caption_ceiling.py --num-colors 10 --min-objects 1 --max-objects 3   # make demo's world
"""

from __future__ import annotations

import argparse
import random

from blip2_train.demo.world import POSITIONS, SHAPES, add_world_arguments, describe, sample_objects, world_of


def cider(refs: list[list[str]], preds: list[str]) -> float:
    from pycocoevalcap.cider.cider import Cider

    return 100 * float(Cider().compute_score({i: r for i, r in enumerate(refs)},
                                             {i: [p] for i, p in enumerate(preds)})[0])


def ceiling(num_colors: int, min_objects: int, max_objects: int, images: int = 200, candidates: int = 150,
            seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    scenes = [sample_objects(rng, min_objects, max_objects, num_colors) for _ in range(images)]
    refs = [[describe(o, rng) for _ in range(rng.randint(1, 5))] for o in scenes]  # make_synthetic's 1-5 captions

    def moved(o):  # the same (colour, shape) objects in quadrants drawn anew
        return [(c, s, p) for (c, s, _), p in zip(o, rng.sample(list(POSITIONS), len(o)))]

    fixed = [describe(sample_objects(rng, min_objects, max_objects, num_colors), rng) for _ in range(candidates)]
    out = {"blind": max(cider(refs, [c] * images) for c in fixed),
           "perfect": cider(refs, [describe(o, rng) for o in scenes]),
           "colours_and_shapes": cider(refs, [describe(moved(o), rng) for o in scenes]),
           "colours_only": cider(refs, [describe([(c, rng.choice(SHAPES), p) for c, _, p in moved(o)], rng)
                                        for o in scenes])}
    out.update({f"{k}/blind": v / out["blind"] for k, v in out.items() if k != "blind"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_world_arguments(p)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--candidates", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    try:
        world_of(a)
    except ValueError as e:
        p.error(str(e))
    r = ceiling(a.num_colors, a.min_objects, a.max_objects, a.images, a.candidates, a.seed)
    print(f"world: {a.num_colors} colours, {a.min_objects}-{a.max_objects} shapes, {a.images} test images")
    print(f"CIDEr, best of {a.candidates} fixed captions (image-blind): {r['blind']:.1f}")
    for k in ("perfect", "colours_and_shapes", "colours_only"):
        print(f"CIDEr, {k.replace('_', ' ')}: {r[k]:.1f} ({r[k + '/blind']:.1f}x the image-blind)")


if __name__ == "__main__":
    main()
