#!/usr/bin/env python
"""DEMO STAND-IN for a pretrained image encoder (`blip2_train/demo/vit.py`): the tiny ViT of
conf/arch/tiny.yaml, pretrained for seconds on the synthetic train scenes, saved as a vision tower that stage 1
loads with `paths.vision_checkpoint=<data_dir>/vit` (docs/itm_at_tiny_size.md).

    python data_scripts/pretrain_demo_vit.py --data-dir data/synthetic --out data/synthetic/vit
"""

import argparse

from omegaconf import OmegaConf

from blip2_train.config.compose import compose
from blip2_train.demo.vit import pretrain_demo_vit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    # the ViT shape preset=tiny trains with: one owner, conf/arch/tiny.yaml (image size from the preset)
    vision = OmegaConf.to_container(compose("train", ["experiment=stage1_pretrain", "preset=tiny"]).arch.vision,
                                    resolve=True)
    r = pretrain_demo_vit(a.data_dir, a.out, vision, a.steps, a.batch_size, a.lr, a.seed,
                          log=lambda s: print(s, flush=True))
    print(f"DEMO STAND-IN for a pretrained ViT saved to {a.out}: per-patch colour accuracy "
          f"{r['patch_color_accuracy']:.1%}, shape {r['patch_shape_accuracy']:.1%}, cell {r['patch_cell_accuracy']:.1%} on {r['held_out_train_images']} "
          f"train images it did not train on ({r['seconds']} s)")


if __name__ == "__main__":
    main()
