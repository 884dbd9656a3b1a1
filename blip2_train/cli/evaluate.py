"""`blip2-eval`: evaluate a checkpoint with the reference protocols, write metrics.json.

    blip2-eval experiment=retrieval_flickr_eval paths.stage1_checkpoint=<export dir | .pth>
    torchrun --nproc_per_node=8 -m blip2_train.cli.evaluate experiment=caption_coco_eval paths.stage2_checkpoint=...
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from blip2_train.cli.app import instantiate_logged, resolve_run_dir, run_cli
from blip2_train.distributed.launch import is_rank_zero
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger("blip2_train.eval")


def evaluate(cfg: DictConfig) -> dict:
    """One process, or one per device under torchrun / srun: each rank encodes and scores its share of the
    images, results are gathered, and rank 0 alone writes metrics.json and the predictions."""
    from blip2_train.utils.checkpoints import load_lightning_checkpoint
    from blip2_train.eval.runner import run_evaluation
    from blip2_train.distributed.launch import init_distributed, shutdown_distributed

    device, created = init_distributed(str(cfg.get("device", "auto")))
    try:
        run_dir = resolve_run_dir(cfg)
        if is_rank_zero():
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        datamodule = instantiate_logged(cfg.data)
        model = instantiate_logged(cfg.model)
        if cfg.get("checkpoint"):
            load_lightning_checkpoint(model, cfg.checkpoint)
        model.to(device)
        metrics = run_evaluation(model, datamodule, cfg.eval, out_dir=run_dir)
        if is_rank_zero():
            write_json_atomic(run_dir / "metrics.json", metrics)
            print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    finally:
        if created:
            shutdown_distributed()
    return {"output_dir": str(run_dir), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    return run_cli("eval", evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
