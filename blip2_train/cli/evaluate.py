"""`blip2-eval`: evaluate a checkpoint with the reference protocols, write metrics.json.

    blip2-eval experiment=retrieval_flickr_eval paths.stage1_checkpoint=<export dir | .pth>
    torchrun --nproc_per_node=8 -m blip2_train.cli.evaluate experiment=caption_coco_eval paths.stage2_checkpoint=...
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from blip2_train.cli.app import instantiate_logged, record_run, resolve_run_dir, run_cli, run_summary, work_started
from blip2_train.distributed.launch import is_rank_zero
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger("blip2_train.eval")


def evaluate(cfg: DictConfig) -> dict:
    """One process, or one per device under torchrun / srun: each rank encodes and scores its share of the
    images, results are gathered, and rank 0 alone writes metrics.json and the predictions."""
    from blip2_train.utils.checkpoints import load_lightning_checkpoint
    from blip2_train.eval.runner import check_kind_fits, run_evaluation
    from blip2_train.distributed.launch import init_distributed, shutdown_distributed

    check_checkpoint(cfg)
    evaluate_instruct_export_as_such(cfg)
    device, created = init_distributed(str(cfg.get("device", "auto")))
    try:
        run_dir = resolve_run_dir(cfg)
        record_run(cfg, run_dir)
        datamodule = instantiate_logged(cfg.data)
        model = instantiate_logged(cfg.model)
        if cfg.get("checkpoint"):
            load_lightning_checkpoint(model, cfg.checkpoint)
        model.to(device)
        check_kind_fits(model, cfg.eval.get("kind", "retrieval"))
        work_started()
        metrics = run_evaluation(model, datamodule, cfg.eval, out_dir=run_dir)
        if is_rank_zero():
            write_json_atomic(run_dir / "metrics.json", metrics)
    finally:
        if created:
            shutdown_distributed()
    rows = [("run", str(run_dir)), ("metrics", f"{run_dir / 'metrics.json'} (every figure)")]
    return {"output_dir": str(run_dir), "metrics": metrics,
            "summary": run_summary(f"{cfg.get('task_name', 'eval')}: {cfg.eval.get('kind', 'retrieval')} evaluation "
                                   "done", metrics, rows)}


def evaluate_instruct_export_as_such(cfg: DictConfig) -> None:
    """An InstructBLIP export given where a caption or VQA evaluation takes a stage-2 one (paths.stage2_checkpoint)
    is evaluated as what it is: the model built from it (LLM, Q-Former tokenizer and all), the evaluation's prompt
    its instruction, for the Q-Former and the LLM."""
    from pathlib import Path

    from omegaconf import open_dict

    from blip2_train.models.build_stage1 import checkpoint_stage
    from blip2_train.models.export import export_meta

    src = cfg.model.get("stage2_checkpoint")
    if "build_stage2" not in str(cfg.model.get("_target_", "")) or not src or checkpoint_stage(src) != 3:
        return
    p = Path(str(src))
    if not p.is_dir():
        return  # a .ckpt / reference .pth of stage 3: the stage-2 builder refuses it in one line
    log.info("%s is an InstructBLIP export: evaluating it as one (the prompt is its instruction)", p)
    keep = ("vision", "qformer", "num_query_tokens", "llm_dtype", "vision_dtype", "ln_vision_eps",
            "attn_implementation", "llm_attn_implementation", "seed")
    text = {"kind": "instruct", "num_query_tokens": cfg.model.num_query_tokens,
            "qformer_tokenizer": str(p / "qformer_tokenizer"), "max_txt_len": export_meta(p).get("max_txt_len"),
            "prompt": (cfg.model.get("text") or {}).get("prompt", "")}
    with open_dict(cfg):
        cfg.model = {"_target_": "blip2_train.models.build_instruct.build_instruct_model",
                     **{k: cfg.model[k] for k in keep if k in cfg.model}, "llm": str(p), "tokenizer": str(p),
                     "instruct_checkpoint": str(p), "text": text}


def check_checkpoint(cfg: DictConfig) -> None:
    """`checkpoint` (a Lightning .ckpt) must fit the model this evaluation builds, its stage and its tower shapes:
    told before any work, since the model (its LLM included) is built before the checkpoint is read."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from blip2_train.models.build_stage1 import USES, checkpoint_stage, refuse_other_shapes, tower_shapes
    from blip2_train.utils.errors import CheckpointError

    if not cfg.get("checkpoint"):
        return
    p = Path(str(cfg.checkpoint))
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (checkpoint)")
    got = checkpoint_stage(p)
    if p.is_dir() and p.suffix != ".ckpt" and got is not None:  # an export: the model's builder loads it
        key = "paths.stage1_checkpoint" if got == 1 else "paths.stage2_checkpoint"
        raise CheckpointError(f"checkpoint={p} is a stage-{got} export: give it as {key}={p} with checkpoint=null "
                              "(checkpoint takes a Lightning .ckpt)")
    want = 2 if "build_stage2" in str(cfg.model.get("_target_", "")) else 1
    if got is not None and got != want:
        raise CheckpointError(f"checkpoint={p} is a stage-{got} checkpoint, and this evaluation (eval.kind="
                              f"{cfg.eval.get('kind')}) builds a stage-{want} model: {USES[got]} (the evaluations "
                              f"take an export: blip2-export {p} --out DIR)")
    model = cfg.model
    shapes = tower_shapes(OmegaConf.to_container(model.vision, resolve=True),
                          OmegaConf.to_container(model.qformer, resolve=True), model.num_query_tokens,
                          model.get("embed_dim") if want == 1 else None)
    refuse_other_shapes(p, shapes, "checkpoint")


def main(argv: list[str] | None = None) -> int:
    return run_cli("eval", evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
