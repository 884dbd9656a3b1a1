"""Run an evaluation of `eval.kind` (retrieval or classify for stage-1 models, caption or vqa for stage 2) on one
process or sharded over N ranks."""

from __future__ import annotations

import logging

from blip2_train.distributed.collectives import rank, shard_range, world_size
from blip2_train.eval.retrieval import evaluate_retrieval

log = logging.getLogger(__name__)
EVAL_KINDS = ("retrieval", "caption", "vqa", "classify")
STAGE1_KINDS = ("retrieval", "classify")  # scored with ITC / ITM; the others generate with a stage-2 model


def check_kind_fits(model, kind: str) -> None:
    """Retrieval scores a stage-1 model (ITC / ITM); captioning and VQA generate with a stage-2 one."""
    from blip2_train.models.stage2 import Blip2Stage2
    from blip2_train.utils.errors import ConfigError

    if kind in EVAL_KINDS and (kind not in STAGE1_KINDS) != isinstance(model, Blip2Stage2):
        needs = ("a stage-2 model (an LLM to generate with)" if kind not in STAGE1_KINDS
                 else "a stage-1 model (ITC / ITM)")
        raise ConfigError(f"eval.kind={kind} needs {needs}, and the model here is stage "
                          f"{2 if isinstance(model, Blip2Stage2) else 1}: choose the evaluation experiment of its "
                          "stage (retrieval_*_eval or classify_zeroshot_eval for stage 1; caption_*_eval or "
                          "vqa_*_eval for stage 2)")


def run_evaluation(model, datamodule, cfg, out_dir=None) -> dict[str, float]:
    """`cfg.kind`: retrieval or classify (stage 1), caption or vqa (stage 2). Every rank calls this; metrics are complete on
    rank 0 (retrieval: on every rank)."""
    from blip2_train.utils.errors import ConfigError

    kind = cfg.get("kind", "retrieval")
    check_kind_fits(model, kind)
    if kind == "classify":  # an image folder or CSV of labelled images, not a captioned set
        from blip2_train.eval.classify import evaluate_classify_set

        return evaluate_classify_set(model, datamodule, cfg, out_dir)
    r, w = rank(), world_size()
    data = datamodule.eval_data()
    loader = datamodule.eval_image_loader(r, w)
    image_range = shard_range(len(data), r, w)
    log.info("rank %d/%d encodes images [%d, %d) of %d", r, w, *image_range, len(data))
    if (kind == "vqa") != hasattr(data, "questions"):
        raise ConfigError(f"eval.kind={kind} does not fit data.eval_set.format={datamodule.eval_set_cfg.get('format')}: "
                          "eval.kind=vqa goes with the question sets (format vqa or gqa, e.g. data=vqav2_eval) only")
    if kind == "caption":
        from blip2_train.eval.captioning import evaluate_captioning

        prompt = datamodule.text.get("prompt") or ""  # the model's text.prompt: the one the model trained with
        gen = cfg.get("generate")
        metrics = evaluate_captioning(model, data, loader, datamodule.tokenizer, prompt,
                                      dict(gen) if gen else None, out_dir, cfg.get("spice", "auto"))
        if cfg.get("image_blind_baseline", False):  # same model, same decoding, every image blank
            blind = evaluate_captioning(model, data, datamodule.eval_image_loader(r, w), datamodule.tokenizer, prompt,
                                        dict(gen) if gen else None, out_dir, cfg.get("spice", "auto"), image_blind=True)
            metrics.update({f"blind/{k}": v for k, v in blind.items() if k not in ("num_images", "eval_seconds")})
        return metrics
    if kind == "vqa":
        from blip2_train.eval.vqa import evaluate_vqa

        template = datamodule.text.get("prompt") or ""  # the model's text.prompt, with the question's place {}
        gen = dict(cfg.get("vqa_generate") or {})
        rule = cfg.get("vqa_metric", "reference")
        metrics = evaluate_vqa(model, data, loader, datamodule.tokenizer, template, gen, out_dir, vqa_metric=rule)
        if cfg.get("image_blind_baseline", False):  # same model, same decoding, every image blank
            blind = evaluate_vqa(model, data, datamodule.eval_image_loader(r, w), datamodule.tokenizer, template, gen,
                                 out_dir, image_blind=True, vqa_metric=rule)
            metrics.update({f"blind/{k}": v for k, v in blind.items()
                            if k not in ("num_questions", "num_scored", "eval_seconds")})
        return metrics
    if kind != "retrieval":
        raise ConfigError(f"eval.kind must be one of {list(EVAL_KINDS)}, not {kind!r}")
    return evaluate_retrieval(model, data, loader, datamodule.tokenizer, image_range, int(cfg.get("k_test", 128)),
                              int(cfg.get("pair_batch_size", 256)), rerank_score=cfg.get("rerank_score", "reference"))
