"""`blip2-train`: compose `conf/train.yaml` + overrides, build data/model/module/trainer, fit, write metrics.json.

    blip2-train experiment=stage1_pretrain paths.bert_dir=/ckpt/bert-base-uncased trainer.max_steps=10
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig

from blip2_train.cli.app import (instantiate_logged, record_run, resolve_run_dir, run_cli, run_summary, to_floats,
                                 work_started)
from blip2_train.cli.log import adopt_library_logging
from blip2_train.distributed.launch import is_rank_zero
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger("blip2_train.train")


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list:
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None or not node.get("_target_"):
            continue
        if not has_logger and node._target_.endswith("LearningRateMonitor"):
            continue  # it refuses to run without a logger; lr is in the progress bar anyway
        out.append(instantiate_logged(node))
    return out


def build_loggers(cfg: DictConfig, run_id: str | None = None) -> list:
    """`run_id` keeps one W&B run across resumes: it is derived from the run directory that owns the
    checkpoint, so a requeued or resumed job appends to the same run instead of starting a new one."""
    from omegaconf import open_dict

    node = cfg.get("logger")
    if not node:
        return []
    out = []
    for n in node.values():
        if n is None or not n.get("_target_"):
            continue
        if n._target_.endswith("WandbLogger") and run_id and not n.get("id"):
            with open_dict(n):
                n.id, n.resume = run_id, "allow"
        out.append(instantiate_logged(n))
    return out


def build_strategy(cfg: DictConfig):
    node = cfg.get("strategy")
    if node is None:
        return "auto"
    if node.get("_target_"):
        return instantiate_logged(node)
    return node.get("name", "auto")


def resolve_ckpt_path(cfg: DictConfig, run_dir) -> str | None:
    """`ckpt_path`: null (fresh run), a file, or `auto` (the run directory's newest intact checkpoint if there is
    one: what a requeued SLURM job uses). A fresh run refuses a directory that already holds checkpoints:
    Lightning would write `last-v1.ckpt` beside the old `last.ckpt` and a later export would silently take the
    old one. Unreadable checkpoints are refused (explicit path) or skipped with a warning (`auto`) before
    anything is written, and the temporary files of killed saves are removed."""
    from blip2_train.utils.checkpoints import checkpoint_problem, newest_intact_checkpoint, remove_save_debris
    from blip2_train.utils.errors import CheckpointError, ConfigError

    if is_rank_zero() and (run_dir / "checkpoints").is_dir():
        for tmp in remove_save_debris(run_dir / "checkpoints"):  # the run lock is ours: no save is in flight
            log.info("removed %s, left by a killed save", tmp.name)
    want = cfg.get("ckpt_path")
    if want == "auto":
        # any checkpoint of this run, or the one Lightning writes when SLURM signals a preemption
        # (hpc_ckpt_N.ckpt): the newest intact one. A kill between step*.ckpt and last.ckpt leaves the step
        # file newer; a truncated last.ckpt falls back to the one before.
        found, bad = newest_intact_checkpoint([*(run_dir / "checkpoints").glob("*.ckpt"),
                                               *run_dir.glob("hpc_ckpt_*.ckpt")])
        if found is not None:
            if bad:
                log.warning("skipping unreadable checkpoint(s) %s; resuming from %s", "; ".join(bad), found)
            log.info("resuming from %s", found)
            return str(found)
        if bad:
            raise CheckpointError(f"ckpt_path=auto: no intact checkpoint in {run_dir}: {'; '.join(bad)}")
        return None
    if want:
        if not os.path.exists(str(want)):
            raise ConfigError(f"ckpt_path: checkpoint not found: {want}")
        problem = checkpoint_problem(want)
        if problem is not None:
            raise CheckpointError(f"ckpt_path: checkpoint {want} is unreadable: {problem}")
        return str(want)
    ckpts = list((run_dir / "checkpoints").glob("*.ckpt")) if (run_dir / "checkpoints").is_dir() else []
    if ckpts and is_rank_zero():
        raise ConfigError(f"{run_dir} already holds checkpoints ({len(ckpts)}): resume with ckpt_path=auto, or choose "
                          "another paths.output_dir")
    return None


def wandb_run_id(ckpt_path: str | None, run_dir: Path) -> str:
    """The run directory that owns the checkpoint (<run>/checkpoints/x.ckpt, <run>/hpc_ckpt_N.ckpt), or this
    run's directory, names the W&B run: a resumed or requeued job appends to the same run."""
    owner = run_dir
    if ckpt_path:
        p = Path(ckpt_path).resolve()
        owner = p.parents[1] if p.parent.name == "checkpoints" else p.parent
    from blip2_train.utils.hashing import stable_hash

    return f"blip2-{stable_hash('wandb', str(owner)):016x}"[:22]


def check_evaluation_fits_strategy(cfg: DictConfig) -> None:
    """Evaluation during or after fit calls the model outside the training engine. Under ZeRO-3 or FSDP the
    parameters are sharded there (each rank holds a slice): refuse before any work rather than fail (or
    silently compute garbage) at the first evaluation. Export the checkpoint and run blip2-eval instead."""
    from blip2_train.utils.errors import ConfigError

    node = cfg.get("strategy") or {}
    target = str(node.get("_target_", ""))
    sharded = ("FSDP" in target or "ModelParallel" in target
               or ("deepspeed" in target and int(node.get("stage", 0) or 0) == 3))
    periodic = ((cfg.get("callbacks") or {}).get("periodic_eval") or {}).get("every_n_steps", 0)
    if sharded and (cfg.eval.get("enabled", False) or periodic):
        raise ConfigError("evaluation inside blip2-train is not supported with sharded parameters (ZeRO-3 / FSDP): "
                          "set eval.enabled=false callbacks.periodic_eval.every_n_steps=0, then export the "
                          "checkpoint and run blip2-eval")


def check_low_memory_fits(cfg: DictConfig) -> None:
    """Adapters and quantised towers where they can work, refused before any work elsewhere: a stage-1 model has
    no LLM to adapt; FSDP and DeepSpeed shard or cast the parameters they hold, and cannot hold bitsandbytes'
    integer weights (DDP keeps the quantised tower whole on each GPU, which is its point). (fp16 with T5 is refused
    where the LLM loads, quantised or not: models/llm.py.)"""
    from blip2_train.utils.errors import ConfigError

    model = cfg.get("model") or {}
    kind = str((cfg.get("adapter") or {}).get("kind") or "none")
    quant = {k: model.get(k) for k in ("llm_quant", "vision_quant") if model.get(k)}
    if "llm_quant" not in model and (kind != "none" or quant):
        raise ConfigError(f"adapter={kind} / quantisation: this model ({model.get('_target_', '?')}) has no LLM; "
                          "they apply to stage 2, caption fine-tuning and instruction tuning")
    if quant and (cfg.get("module") or {}).get("save_frozen_weights"):
        raise ConfigError("module.save_frozen_weights=true with a quantised tower: its integer weights and their "
                          "quantisation state do not load back; the frozen weights come from the model config")
    target = str((cfg.get("strategy") or {}).get("_target_", ""))
    if quant and ("FSDP" in target or "deepspeed" in target):
        name = "fsdp" if "FSDP" in target else "deepspeed"
        raise ConfigError(f"model.{next(iter(quant))}={next(iter(quant.values()))} under strategy={name}: a "
                          "quantised tower cannot be sharded or cast by it; use strategy=ddp (each GPU holds the "
                          "quantised tower, a 7B LLM in NF4 is ~3.9 GB)")


def train(cfg: DictConfig) -> dict:
    import lightning as L
    import torch

    adopt_library_logging()
    # Our data module restores the exact data position itself (state_dict / load_state_dict).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    check_low_memory_fits(cfg)
    check_evaluation_fits_strategy(cfg)
    run_dir = resolve_run_dir(cfg)
    ckpt_path = resolve_ckpt_path(cfg, run_dir)
    record_run(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere+: free speed for the fp32 parts

    datamodule = instantiate_logged(cfg.data)
    model = instantiate_logged(cfg.model)
    module = instantiate_logged(cfg.module, model=model)
    loggers = build_loggers(cfg, run_id=wandb_run_id(ckpt_path, run_dir))
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    strategy = build_strategy(cfg)
    plugins = []
    if "DeepSpeed" not in type(strategy).__name__ and "deepspeed" not in str(strategy):
        from blip2_train.lit.checkpoint_io import AtomicCheckpointIO

        plugins.append(AtomicCheckpointIO())  # DeepSpeed writes its own sharded checkpoint directories
    trainer = instantiate_logged(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy,
                                 plugins=plugins, default_root_dir=str(run_dir))
    work_started()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    stopped = signal_stop_of(trainer)
    if stopped is not None:  # no final evaluation and no metrics.json: the run is not finished
        where = f"checkpoint {stopped['checkpoint']}" if stopped["checkpoint"] else "no checkpoint (checkpointing off)"
        return {"output_dir": str(run_dir), "exit_code": stopped["exit_code"],
                "message": f"stopped by {stopped['signal']} after step {stopped['step']}: {where}; resume with the "
                           "same command plus ckpt_path=auto"}

    metrics = to_floats(trainer.callback_metrics)
    metrics["global_step"] = trainer.global_step
    metrics["nonfinite_skipped"] = module.nonfinite_total
    if cfg.eval.get("enabled", False):
        from blip2_train.eval.runner import run_evaluation

        done = periodic_result_at(trainer, cfg.eval)
        if done is not None:  # the periodic evaluation just ran the same protocol at this step
            metrics.update(done)
        else:
            metrics.update(run_evaluation(module.model, datamodule, cfg.eval, out_dir=run_dir))
    if trainer.is_global_zero:
        write_json_atomic(run_dir / "metrics.json", metrics)
        log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    finish_loggers()  # their own closing lines (W&B's) come before the summary, which ends the output
    return {"output_dir": str(run_dir), "metrics": metrics, "summary": train_summary(cfg, trainer, metrics, run_dir)}


def finish_loggers() -> None:
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def train_summary(cfg: DictConfig, trainer, metrics: dict, run_dir: Path) -> list[str]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    mc = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
    last = Path(mc.dirpath) / f"{mc.CHECKPOINT_NAME_LAST}{mc.FILE_EXTENSION}" if mc else None
    rows = [("run", str(run_dir)), ("metrics", str(run_dir / "metrics.json"))]
    if last is not None and last.exists():
        step = getattr(mc, "_last_global_step_saved", None)  # the step last.ckpt was last written at
        rows += [("checkpoint", f"{last}" + (f" (step {step})" if step else "")),
                 ("next", f"blip2-export {last} --out {run_dir / 'export'}")]
    title = f"{cfg.get('task_name', 'run')}: {trainer.global_step} steps done"
    return run_summary(title, metrics, rows)


def signal_stop_of(trainer) -> dict | None:
    """What the SignalStop callback recorded when a signal stopped the run (the same on every rank), else None."""
    from blip2_train.lit.signal_stop import SignalStop

    return next((cb.stopped for cb in trainer.callbacks if isinstance(cb, SignalStop) and cb.stopped), None)


def periodic_result_at(trainer, eval_cfg) -> dict | None:
    """The periodic evaluation's metrics at the final step when it ran the protocol of `eval_cfg`, with its output
    files copied into the run directory; None otherwise. A run whose last step is an evaluation step (the
    experiments' defaults: every 10k of 250k steps) would otherwise evaluate the same weights twice: a COCO 5k
    retrieval or captioning pass. Every rank takes the same branch (the history is broadcast from rank 0)."""
    import shutil

    from blip2_train.eval.callback import PeriodicEvaluation

    for cb in trainer.callbacks:
        if not isinstance(cb, PeriodicEvaluation) or not cb.history or cb.history[-1]["step"] != trainer.global_step:
            continue
        if PeriodicEvaluation.protocol(cb.cfg) != PeriodicEvaluation.protocol(eval_cfg):
            continue
        src = Path(trainer.default_root_dir) / "eval" / f"step{trainer.global_step:07d}"
        if trainer.is_global_zero and src.is_dir():
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, Path(trainer.default_root_dir) / f.name)
        log.info("final evaluation: the periodic evaluation of step %d (same protocol), not run again",
                 trainer.global_step)
        return {k: v for k, v in cb.history[-1].items() if k != "step"}
    return None


def main(argv: list[str] | None = None) -> int:
    return run_cli("train", train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
