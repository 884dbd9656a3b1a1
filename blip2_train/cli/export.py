"""`blip2-export`: a training checkpoint -> a transformers directory.

    blip2-export outputs/stage1_pretrain/<run>/checkpoints/last.ckpt --out exports/stage1
    Blip2ForImageTextRetrieval.from_pretrained("exports/stage1")   # then works
"""

from __future__ import annotations

import argparse
import sys

from blip2_train.cli.common import setup_logging
from blip2_train.utils.errors import Blip2TrainError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip2-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="Lightning .ckpt written by blip2-train")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    setup_logging()
    try:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from blip2_train.cli.checkpoints import load_lightning_checkpoint, run_config_of
        from blip2_train.models.build import parse_dtype
        from blip2_train.models.export import export_stage1
        from blip2_train.models.tokenizer import load_qformer_tokenizer

        cfg = OmegaConf.load(a.config) if a.config else run_config_of(a.checkpoint)
        if "Stage1" not in str(cfg.module.get("_target_", "")):
            raise Blip2TrainError(f"only stage-1 runs can be exported so far (module {cfg.module._target_})")
        model = instantiate(cfg.model)
        load_lightning_checkpoint(model, a.checkpoint)
        out = export_stage1(model, load_qformer_tokenizer(cfg.model.tokenizer), a.out, int(cfg.data.image_size),
                            parse_dtype(a.dtype))
    except Blip2TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
