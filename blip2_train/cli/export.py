"""`blip2-export`: a training checkpoint -> a transformers directory.

    blip2-export outputs/stage1_pretrain/<run>/checkpoints/last.ckpt --out exports/stage1
    Blip2ForImageTextRetrieval.from_pretrained("exports/stage1")   # then works (stage-1 runs)
    Blip2ForConditionalGeneration.from_pretrained("exports/stage2") + Blip2Processor (stage-2 runs)
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
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the export (default: stage 1 float32; stage 2 as trained: frozen LLM in its dtype)")
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
        target = str(cfg.module.get("_target_", ""))
        model = instantiate(cfg.model)
        load_lightning_checkpoint(model, a.checkpoint)
        if "Stage1" in target:
            out = export_stage1(model, load_qformer_tokenizer(cfg.model.tokenizer), a.out, int(cfg.data.image_size),
                                parse_dtype(a.dtype or "float32"))
        elif "Stage2" in target:
            from blip2_train.eval.captioning import CAPTION_GENERATION
            from blip2_train.models.export import export_stage2
            from blip2_train.models.llm import load_llm_tokenizer

            gen = (cfg.get("eval") or cfg.get("final_eval") or {}).get("generate")  # final_eval: older runs
            gen = {**CAPTION_GENERATION, **(OmegaConf.to_container(gen) if gen else {})}
            prompt = (cfg.model.get("text") or {}).get("prompt", cfg.model.get("prompt"))
            out = export_stage2(model, load_llm_tokenizer(cfg.model.llm), a.out, int(cfg.data.image_size),
                                prompt=prompt or "", generate_kwargs=gen,
                                dtype=parse_dtype(a.dtype) if a.dtype else None)
        else:
            raise Blip2TrainError(f"{a.checkpoint}: unknown module {target!r} in the run's config")
    except Blip2TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
