"""Evaluation during training: retrieval (stage 1) or captioning (stage 2 / fine-tuning) every N steps.

Metrics go to the active logger as `val/<metric>` (so `ModelCheckpoint(monitor="val/cider")` can keep the
best checkpoint), predictions and a sample table under `<run>/eval/step<N>/`, and to W&B as a table when
W&B is the logger.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blip2_train.lit.periodic import EveryNSteps

log = logging.getLogger(__name__)


def broadcast_from_rank_zero(obj):
    import torch.distributed as dist

    from blip2_train.distributed.collectives import is_dist

    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class PeriodicEvaluation(EveryNSteps):
    def __init__(self, kind: str = "retrieval", every_n_steps: int = 5000, k_test: int = 128,
                 pair_batch_size: int = 256, generate: dict | None = None, image_blind_baseline: bool = False,
                 vqa_generate: dict | None = None, samples_in_table: int = 8, prefix: str = "val/",
                 rerank_score: str = "reference", vqa_metric: str = "reference"):
        self.cfg = {"kind": kind, "k_test": k_test, "pair_batch_size": pair_batch_size, "rerank_score": rerank_score,
                    "generate": dict(generate) if generate else None, "image_blind_baseline": image_blind_baseline,
                    "vqa_generate": dict(vqa_generate) if vqa_generate else None, "vqa_metric": vqa_metric}
        super().__init__(every_n_steps)
        self.samples_in_table = samples_in_table
        self.prefix = prefix
        self.history: list[dict] = []

    @staticmethod
    def protocol(cfg) -> dict:
        """What decides an evaluation's result (with `run_evaluation`'s defaults): two configs of one protocol
        give the same metrics on the same weights. Batch sizes only change how the work is cut."""
        kind = cfg.get("kind", "retrieval")
        if kind == "retrieval":
            return {"kind": kind, "k_test": int(cfg.get("k_test", 128)),
                    "rerank_score": cfg.get("rerank_score", "reference")}
        key = "generate" if kind == "caption" else "vqa_generate"
        out = {"kind": kind, key: dict(cfg.get(key) or {}), "blind": bool(cfg.get("image_blind_baseline", False))}
        if kind == "caption":
            out["spice"] = cfg.get("spice", "auto")
        else:  # the headline accuracy's scorer
            out["vqa_metric"] = cfg.get("vqa_metric", "reference")
        return out

    def at_step(self, trainer, pl_module, step: int) -> None:
        self.evaluate(trainer, pl_module, step)

    def evaluate(self, trainer, pl_module, step: int) -> dict:
        from blip2_train.eval.runner import run_evaluation

        out_dir = Path(trainer.default_root_dir) / "eval" / f"step{step:07d}"
        metrics = run_evaluation(pl_module.model, trainer.datamodule, self.cfg, out_dir=out_dir)
        metrics = broadcast_from_rank_zero(metrics)  # caption metrics exist on rank 0 only
        named = {self.prefix + k: float(v) for k, v in metrics.items()}
        # Straight to the loggers at this step (self.log would repeat the value at later logging steps), and
        # into callback_metrics, where ModelCheckpoint(monitor=...) reads it, on every rank.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
        if trainer.is_global_zero:
            for lg in trainer.loggers:
                lg.log_metrics(named, step=step)
        self.history.append({"step": step, **metrics})
        if trainer.is_global_zero and self.cfg["kind"] == "caption":
            self.sample_table(trainer, out_dir, step)
        return metrics

    def sample_table(self, trainer, out_dir: Path, step: int) -> None:
        import json

        preds_path = out_dir / "captions_predictions.json"
        if not preds_path.exists():
            return
        preds = json.loads(preds_path.read_text())[: self.samples_in_table]
        data = trainer.datamodule.eval_data()
        index = {str(i): n for n, i in enumerate(data.image_ids)}
        rows = []
        for p in preds:
            n = index.get(str(p["image_id"]))
            refs = data.raw_captions[n] if n is not None else []
            rows.append((str(p["image_id"]), p["caption"], refs[0] if refs else ""))
        lines = ["| image | generated | a reference |", "| --- | --- | --- |"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        (out_dir / "samples.md").write_text("\n".join(lines) + "\n")
        for lg in trainer.loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.log_table(key=f"{self.prefix}samples", columns=["image", "generated", "reference"],
                             data=[list(r) for r in rows], step=step)
