"""`blip2-export`: a training checkpoint -> a transformers directory.

    blip2-export outputs/stage1_pretrain/<run>/checkpoints/last.ckpt --out exports/stage1
    Blip2ForImageTextRetrieval.from_pretrained("exports/stage1")   # then works (stage-1 runs)
    Blip2ForConditionalGeneration.from_pretrained("exports/stage2") + Blip2Processor (stage-2 runs)

A reference stage-2 .pth (blip2_pretrained_opt2.7b.pth, blip2_caption_flant5xl.pth, ...) holds no LLM: give
the local LLM directory it was trained with; the model config is stage2_opt / stage2_flant5 (by its projection)
unless --model says otherwise, and trailing key=value pairs override it:
    blip2-export blip2_caption_opt2.7b.pth --llm /ckpt/opt-2.7b --prompt "a photo of" --out exports/caption_opt
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from blip2_train.cli.log import setup_logging
from blip2_train.utils.errors import Blip2TrainError


def reference_config(a):
    """The run config a reference stage-2 .pth would have had: model from `--model` (or its projection's LLM
    family), LLM from `--llm`, image size from its position embeddings, the .pth as model.stage2_checkpoint."""
    from omegaconf import OmegaConf

    from blip2_train.config.compose import compose
    from blip2_train.cli.errors import describe_config_error
    from blip2_train.models import convert
    from blip2_train.utils.errors import CheckpointError, ConfigError

    if not a.llm:
        raise ConfigError(f"{a.checkpoint} is not a Lightning checkpoint: a reference stage-2 .pth holds no LLM, "
                          "pass --llm <local LLM directory>")
    ref = convert.load_reference_pth(a.checkpoint)
    family = convert.reference_projection_family(ref)
    if family is None:
        raise CheckpointError(f"{a.checkpoint}: not a reference stage-2 checkpoint (no opt_proj.* / t5_proj.*); "
                              "stage-1 files export after training (blip2-train experiment=stage2_pretrain)")
    from transformers import AutoConfig

    from blip2_train.models.build_stage2 import check_reference_llm
    from blip2_train.models.llm import require_model_dir

    llm_dir = require_model_dir(a.llm, "LLM directory")
    # before its tokenizer is read
    check_reference_llm(a.checkpoint, family, AutoConfig.from_pretrained(llm_dir).model_type, "--llm")
    model = a.model or next((o.split("=", 1)[1] for o in a.overrides if o.startswith("model=")), None)
    overrides = [f"model={model or ('stage2_flant5' if family == 't5' else 'stage2_opt')}", f"paths.llm_dir={a.llm}",
                 "paths.stage1_checkpoint=null", "module=stage2",
                 f"model.stage2_checkpoint={Path(a.checkpoint).resolve()}"]
    try:
        cfg = compose("train", overrides + [o for o in a.overrides if not o.startswith("model=")])
    except Exception as e:  # a misspelt key or value: one line, as blip2-train says it
        raise ConfigError(describe_config_error(e)) from None
    size, patch = a.image_size, int(cfg.model.vision.patch_size)
    if size is None:
        pos = ref.get("visual_encoder.pos_embed")
        if pos is None:
            raise ConfigError(f"{a.checkpoint} holds no visual_encoder.pos_embed: pass --image-size")
        size = math.isqrt(pos.shape[1] - 1) * patch
    elif size < patch or size % patch:
        raise ConfigError(f"--image-size {size} does not fit the ViT's patch size ({patch}): must be a multiple of "
                          f"{patch}, e.g. {max(patch, size // patch * patch)}")
    cfg.data.image_size = size
    if a.prompt is not None:
        cfg.model.text.prompt = a.prompt
    from blip2_train.config.ranges import check_ranges

    check_ranges(cfg)  # the trailing overrides, as blip2-train checks them
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def export_llm_side(cfg, a) -> str | None:
    """The LLM as an export needs it: unquantised (a quantised run's adapter merges into, or goes beside, the
    original weights, so the export differs from the trained model by the quantisation's rounding only); -> the
    base LLM an adapter-only export names, None for a merged export."""
    import logging

    from blip2_train.utils.errors import ConfigError

    model = cfg.model
    for key in ("llm_quant", "vision_quant"):
        if model.get(key):
            logging.getLogger(__name__).info("model.%s=%s: exported from the unquantised weights", key, model[key])
            model[key] = None
    kind = str((model.get("adapter") or {}).get("kind") or "none")
    if not a.adapter_only:
        return None
    if kind == "none":
        raise ConfigError(f"--adapter-only: {a.checkpoint} was trained without an adapter (adapter=none); export "
                          "it without --adapter-only")
    return str(model.llm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip2-export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="Lightning .ckpt written by blip2-train, or a reference stage-2 .pth")
    p.add_argument("overrides", nargs="*", help="reference .pth only: Hydra overrides, e.g. model.num_query_tokens=32")
    p.add_argument("--llm", help="reference .pth only: the local LLM directory it was trained with")
    p.add_argument("--model", help="reference .pth only: model config (default stage2_opt / stage2_flant5)")
    p.add_argument("--image-size", type=int, help="reference .pth only (default: from its position embeddings)")
    p.add_argument("--prompt", help="reference .pth only: the prompt recorded for generation (default: the "
                   "model config's)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--config", help="the run's config.yaml (default: found beside the checkpoint)")
    p.add_argument("--adapter-only", action="store_true",
                   help="a LoRA run: keep the adapter apart (llm_adapter/, a peft adapter on the unchanged base LLM) "
                   "instead of merging it into the LLM's weights")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the export (default: stage 1 float32; stage 2 as trained: frozen LLM in its dtype)")
    from blip2_train.models.card import hub_repo_id

    p.add_argument("--push-to-hub", metavar="ORG/NAME", type=hub_repo_id,
                   help="then upload the export (model card included) to this Hugging Face Hub repo")
    p.add_argument("--private", action="store_true", help="--push-to-hub: create the repo private")
    p.add_argument("--revision", help="--push-to-hub: the branch to upload to (created if missing)")
    p.add_argument("--base-model", metavar="ORG/NAME", type=hub_repo_id, action="append", default=[],
                   help="the hub id of a base this was built from (repeatable), for the model card's base_model: "
                   "local paths cannot say which hub model they hold")
    a = p.parse_intermixed_args(argv)
    setup_logging()
    try:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from blip2_train.utils.checkpoints import load_lightning_checkpoint, run_config_of
        from blip2_train.models.build_stage1 import parse_dtype
        from blip2_train.models.export import export_stage1
        from blip2_train.models.tokenizer import load_qformer_tokenizer

        reference = Path(a.checkpoint).is_file() and Path(a.checkpoint).suffix != ".ckpt"
        if reference:
            cfg = reference_config(a)
        else:
            cfg = OmegaConf.load(a.config) if a.config else run_config_of(a.checkpoint)
        target = str(cfg.module.get("_target_", ""))
        if ("Stage2" in target or "Instruct" in target) and cfg.model.get("freeze_vision", False) and not reference:
            # The frozen tower ran in arch.frozen_dtype (bf16) but was never trained: export it in its source
            # precision (rebuilt from the stage-1 result), so fine-tuning that unfreezes it starts from the
            # original weights rather than bf16-rounded ones. The LLM stays as trained (config.json says so).
            cfg.model.vision_dtype = "float32"
        adapter_base = export_llm_side(cfg, a)
        try:
            model = instantiate(cfg.model)
        except Exception as e:  # noqa: BLE001 - our own error, wrapped by hydra's instantiate
            from blip2_train.cli.errors import causes

            raise next((c for c in causes(e) if isinstance(c, Blip2TrainError)), e) from None
        step = None  # the checkpoint's training step, for the model card
        if not reference:  # a reference .pth was read by the model's builder (model.stage2_checkpoint)
            step = load_lightning_checkpoint(model, a.checkpoint).get("global_step")
        if adapter_base is None and hasattr(model, "llm"):
            from blip2_train.models.adapters import has_adapter, merge_adapter

            if has_adapter(model.llm):
                merge_adapter(model.llm)
        if "Stage1" in target:
            from blip2_train.models.build_stage1 import qformer_tokenizer_source

            tok = load_qformer_tokenizer(qformer_tokenizer_source(cfg.model.tokenizer, cfg.model.stage1_checkpoint))
            out = export_stage1(model, tok, a.out, int(cfg.data.image_size), parse_dtype(a.dtype or "float32"))
        elif "Stage2" in target:
            from blip2_train.eval.captioning import CAPTION_GENERATION
            from blip2_train.models.export import export_stage2
            from blip2_train.models.llm import load_llm_tokenizer

            gen = (cfg.get("eval") or cfg.get("final_eval") or {}).get("generate")  # final_eval: older runs
            gen = {**CAPTION_GENERATION, **(OmegaConf.to_container(gen) if gen else {})}
            prompt = (cfg.model.get("text") or {}).get("prompt", cfg.model.get("prompt"))
            out = export_stage2(model, load_llm_tokenizer(cfg.model.llm), a.out, int(cfg.data.image_size),
                                prompt=prompt or "", generate_kwargs=gen,
                                dtype=parse_dtype(a.dtype) if a.dtype else None, adapter_base=adapter_base)
        elif "Instruct" in target:
            from blip2_train.eval.generation import INSTRUCT_GENERATION
            from blip2_train.models.export import export_instruct
            from blip2_train.models.llm import load_llm_tokenizer

            text = cfg.model.get("text") or {}
            gen = (cfg.get("eval") or {}).get("instruct_generate")
            gen = {**INSTRUCT_GENERATION, **(OmegaConf.to_container(gen) if gen else {})}
            tok = load_llm_tokenizer(cfg.model.llm, special_tokens=text.get("special_tokens") or None)
            out = export_instruct(model, tok, model.qformer_tokenizer, a.out, int(cfg.data.image_size),
                                  generate_kwargs=gen, dtype=parse_dtype(a.dtype) if a.dtype else None,
                                  template=text.get("prompt"), adapter_base=adapter_base)
        else:
            raise Blip2TrainError(f"{a.checkpoint}: unknown module {target!r} in the run's config")
        from blip2_train.models.card import finish_export

        rows = finish_export(out, checkpoint=a.checkpoint, config_file=a.config, composed=cfg if reference else None,
                             step=step, base_models=a.base_model, push_to_hub=a.push_to_hub, private=a.private,
                             revision=a.revision)
    except Blip2TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    print("\n".join(f"  {k + ':':<11} {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
