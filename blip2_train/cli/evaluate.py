"""`blip2-eval`: evaluate a checkpoint with the reference protocols, write metrics.json.

    blip2-eval experiment=retrieval_flickr_eval model.stage1_checkpoint=<export dir | .pth> paths.bert_dir=...
    blip2-eval experiment=demo_retrieval_eval checkpoint=outputs/.../checkpoints/last.ckpt
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from blip2_train.cli.common import instantiate_logged, is_rank_zero, resolve_run_dir, run_cli, write_json_atomic

log = logging.getLogger("blip2_train.eval")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate(cfg: DictConfig) -> dict:
    from blip2_train.cli.checkpoints import load_lightning_checkpoint
    from blip2_train.eval.runner import run_evaluation

    run_dir = resolve_run_dir(cfg)
    if is_rank_zero():
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    datamodule = instantiate_logged(cfg.data)
    model = instantiate_logged(cfg.model)
    if cfg.get("checkpoint"):
        load_lightning_checkpoint(model, cfg.checkpoint)
    model.to(pick_device(cfg.get("device", "auto")))
    metrics = run_evaluation(model, datamodule, cfg.eval, out_dir=run_dir)
    if is_rank_zero():
        write_json_atomic(run_dir / "metrics.json", metrics)
        print("  ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
    return {"output_dir": str(run_dir), "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    return run_cli("eval", evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
