"""The Hydra app behind every `blip2-*` command that takes a config: `run_cli` runs a job body under Hydra with
one-line errors, one stamp per launch, one run per directory, and sweeps whose jobs do not leak into each other."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, open_dict

from blip2_train.cli.errors import known_error_line
from blip2_train.cli.log import close_log_files, log_to_file, setup_logging
from blip2_train.cli.run_lock import LOCK_NAME, acquire_run_lock, holds_lock, release_run_locks
from blip2_train.config.compose import CONFIG_MODULE, register
from blip2_train.config.run_dir import RUN_DIR_ENV, STAMP_ENV, default_run_dir, reset_stamp, run_stamp
from blip2_train.distributed.launch import is_rank_zero
from blip2_train.utils.errors import Blip2TrainError

log = logging.getLogger("blip2_train")

_OWN_FULL_ERROR = "_BLIP2_SET_HYDRA_FULL_ERROR"


def run_cli(config_name: str, body: Callable[[DictConfig], dict], argv: list[str] | None = None) -> int:
    """A Hydra app (`@hydra.main` on the shipped configs): `key=value` overrides, `--cfg job|hydra|all`
    [`--resolve`], `--info`, `-m` sweeps and launcher plugins, `--config-dir`, shell completion; the run
    directory is Hydra's `hydra.run.dir`. Known errors become one line on stderr and exit status 2 (Hydra's
    HYDRA_FULL_ERROR=1 or BLIP2_FULL_ERROR=1 show the traceback)."""
    import hydra

    argv = list(sys.argv[1:] if argv is None else argv)
    results: list[dict] = []
    multirun = "-m" in argv or "--multirun" in argv

    def task(cfg: DictConfig):
        if multirun:
            results.append(_run_sweep_job(cfg, body))
        else:
            results.append(run_job(cfg, body))
            _end_gloo_group_together()
        stopped = results[-1] or {}
        if multirun and stopped.get("exit_code"):  # a signal stops the sweep, not only its current job
            print(stopped["message"], file=sys.stderr)
            raise SystemExit(int(stopped["exit_code"]))
        return results[-1]

    user_full_error = os.environ.get("BLIP2_FULL_ERROR") == "1" or (
        os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_OWN_FULL_ERROR))
    saved_argv = sys.argv
    saved_env = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _OWN_FULL_ERROR, RUN_DIR_ENV, STAMP_ENV)}
    sys.argv = [saved_argv[0], *argv]
    if not user_full_error:  # Hydra then raises, and we print the one line
        os.environ.update({"HYDRA_FULL_ERROR": "1", _OWN_FULL_ERROR: "1"})
    reset_stamp()
    # One stamp for the whole launch: a sweep's jobs (in this process, or wherever submitit runs them: they
    # inherit this environment) and the rank processes Lightning starts resolve the same directories.
    # A launch whose nodes cannot agree on a stamp (torchrun over nodes without --rdzv-id) is refused later, by
    # the run directory's resolver, and only if no paths.output_dir names the directory.
    try:
        os.environ[STAMP_ENV] = run_stamp()
    except Blip2TrainError:
        reset_stamp()
    setup_logging()
    failed_job: list[str] = []
    try:
        register()
        app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(task)
        with _HydraJobErrorFilter(failed_job):
            app()
    except SystemExit as e:  # --help, argparse errors, Hydra's own exits, a job's sys.exit("message")
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - turned into one readable line below
        if user_full_error:
            raise
        msg = known_error_line(e)
        if msg is None:
            raise
        if failed_job and multirun:
            msg += f" ({failed_job[0]})"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        release_run_locks()
        close_log_files()
    exit_code = 0
    for result in results:
        if result and result.get("exit_code"):  # a job that did not finish (a signal stopped it)
            if is_rank_zero():
                print(result["message"], file=sys.stderr)
            exit_code = exit_code or int(result["exit_code"])
        elif result and result.get("output_dir") and is_rank_zero():
            print("\n".join(result.get("summary") or [f"output directory: {result['output_dir']}"]))
    return exit_code


_SOURCE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn")


def _config_source_flags(argv: list[str]) -> list[str]:
    """The flags of `argv` that say where the config comes from (a user's --config-dir): a sweep job's rank
    processes must compose from the same place."""
    kept, it = [], iter(argv)
    for a in it:
        if a in _SOURCE_FLAGS:
            kept += [a, next(it, "")]
        elif a.startswith(tuple(f"{f}=" for f in _SOURCE_FLAGS)):
            kept.append(a)
    return kept


def _run_sweep_job(cfg: DictConfig, body: Callable[[DictConfig], dict]) -> dict:
    """One job of an in-process sweep (`-m` with the basic launcher), isolated from the next one:
    - sys.argv is the job's own overrides: Lightning's launcher re-runs sys.argv for its other ranks
      (strategy=ddp trainer.devices=N), which must run this job, not the sweep again;
    - the job's lock, log file, process group and environment (Lightning's LOCAL_RANK, WORLD_SIZE, MASTER_PORT,
      our BLIP2_RUN_DIR) end with it: the next job would otherwise think it is an already-launched rank."""
    from hydra.core.hydra_config import HydraConfig

    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = [saved_argv[0], *_config_source_flags(saved_argv[1:]), *HydraConfig.get().overrides.task]
    ended = False
    try:
        result = run_job(cfg, body)
        ended = True
        return result
    finally:
        sys.argv = saved_argv
        release_run_locks()
        close_log_files()
        _end_process_group(together=ended)
        os.environ.clear()
        os.environ.update(saved_env)


def _end_process_group(together: bool = False) -> None:
    """Destroy the process group; after a job that ended normally on every rank, gloo ranks first wait for each
    other (`_end_gloo_group_together`). After an error no rank waits: the others may never come."""
    import torch.distributed as dist

    if together:
        _end_gloo_group_together()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _end_gloo_group_together() -> None:
    """A gloo group's ranks wait for each other (a bounded barrier), then destroy it: a rank whose gloo group was
    torn down at interpreter exit while its peer still used the connection was seen to abort there ("terminate
    called without an active exception", exit -6 under torchrun). NCCL groups are left as they were."""
    from datetime import timedelta

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    if dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=120), wait_all_ranks=True)
        except RuntimeError as e:  # a peer that did not come: end anyway, saying so
            import logging

            logging.getLogger(__name__).warning("ranks did not all reach the end: %s", str(e).splitlines()[0])
    dist.destroy_process_group()


class _HydraJobErrorFilter:
    """Hydra writes "Error executing job with overrides: [...]" to stderr before re-raising a job's error; the
    one-line error replaces it (a sweep's error line names the job's overrides instead)."""

    PREFIX = "Error executing job with overrides: "

    def __init__(self, seen: list[str]):
        self.seen, self.stream = seen, None

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX):
            self.seen.append("job " + text[len(self.PREFIX):].strip())
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        self.stream, sys.stderr = sys.stderr, self
        return self

    def __exit__(self, *exc):
        if sys.stderr is self:
            sys.stderr = self.stream


def run_job(cfg: DictConfig, body: Callable[[DictConfig], dict]) -> dict:
    """One job: Hydra's run directory becomes paths.output_dir, the ranges are checked before any work, then
    `body`. A job refused before it wrote anything leaves no directory behind (Hydra creates it up front)."""
    from blip2_train.config.ranges import check_ranges

    run_dir = adopt_hydra_run_dir(cfg)
    fresh = run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir())  # Hydra just made it
    _work_started.clear()
    try:
        refuse_unknown_keys(cfg)
        check_ranges(cfg)
        return body(cfg)
    except Exception as e:
        # refused (one line) before training or evaluation began: not a run that failed later
        if fresh and is_rank_zero() and not _work_started and known_error_line(e) is not None:
            remove_refused_start(run_dir)
        raise


def refuse_unknown_keys(cfg: DictConfig) -> None:
    from blip2_train.config.schemas import unknown_keys
    from blip2_train.utils.errors import ConfigError

    for key in unknown_keys(cfg):
        target = cfg[key.split(".")[0]]._target_
        raise ConfigError(f"unknown config key '{key}': {target} takes no argument '{key.split('.', 1)[1]}' "
                          "(check the spelling)")


def adopt_hydra_run_dir(cfg: DictConfig) -> Path | None:
    """Under Hydra, its job directory (hydra.run.dir, or the sweep's sub-directory) is the run directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    out = Path(HydraConfig.get().runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return out


# What a start writes before it can be refused (the record, the log, the lock): nothing a user would miss
BOOKKEEPING = {".hydra", "config.yaml", ".run.lock"}


_work_started: list[bool] = []


def work_started() -> None:
    """Called by a command body as its real work begins (fit, evaluation): from then on a failure is a run's,
    and its directory stays whatever it holds."""
    _work_started.append(True)


def remove_refused_start(run_dir: Path) -> None:
    """Remove the directory this start made (Hydra creates it up front) when the start was refused before it
    wrote more than its own bookkeeping: no empty run directory is left behind by each refused start."""
    import shutil

    if not run_dir.is_dir() or not all(p.name in BOOKKEEPING or p.suffix == ".log" for p in run_dir.iterdir()):
        return
    if (run_dir / LOCK_NAME).exists() and not holds_lock(run_dir):  # another run started into it meanwhile
        return
    close_log_files()
    release_run_locks()
    shutil.rmtree(run_dir, ignore_errors=True)


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """Rank 0 writes the run's record once the run owns its directory and its start checks passed:
    `config.yaml` (resolved) and Hydra's `.hydra/` (config, hydra, overrides). Hydra would write `.hydra/` before
    the job runs, so a start refused by a run already in the directory would have rewritten that run's record."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if not is_rank_zero():
        return
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        record = run_dir / ".hydra"
        record.mkdir(exist_ok=True)
        (record / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        (record / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
        (record / "overrides.yaml").write_text(OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))


def resolve_run_dir(cfg: DictConfig) -> Path:
    """One output directory per run, also under DDP: Hydra's job directory (set into paths.output_dir by
    `run_job`), else `default_run_dir` for a config composed without Hydra's runtime (tools, tests).

    It is exported in $BLIP2_RUN_DIR, which the processes that Lightning launches inherit. Rank 0 creates it,
    takes its lock and logs into `<run_dir>/<task_name>.log`.
    """
    run_dir = Path(default_run_dir(cfg.paths.get("output_dir"), cfg.paths.log_dir, cfg.get("task_name", "run")))
    run_dir = run_dir.resolve()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_run_lock(run_dir)
        log_to_file(run_dir / f"{cfg.get('task_name', 'run')}.log")
    return run_dir



def to_floats(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def instantiate_logged(node, **kwargs):
    """hydra.utils.instantiate, logging each `_target_` built (the lightning-hydra-template habit)."""
    from hydra.utils import instantiate

    if node is None:
        return None
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target:
        log.info("instantiating <%s>", target)
    return instantiate(node, **kwargs)


# Families of metrics that the end-of-run table leaves to metrics.json (baselines, per-type breakdowns, timings)
_NOT_HEADLINE = ("blind/", "rerank_", "itc_only/", "question_type/", "answer_type/", "in-domain/", "near-domain/",
                 "out-domain/", "entire/", "data/", "eval_", "num_", "global_step", "nonfinite_skipped", "train/samples",
                 "train/lr", "train/temp")


def run_summary(title: str, metrics: dict, rows: list[tuple[str, str]], width: int = 6) -> list[str]:
    """The last lines a command prints: what was done, its main figures (at most `width`, the rest in
    metrics.json), where the outputs went and the next command."""
    main = [(k, v) for k, v in metrics.items() if isinstance(v, float) and not k.startswith(_NOT_HEADLINE)]
    lines = [title]
    if main:
        lines.append("  " + "   ".join(f"{k} {v:.4g}" for k, v in main[:width]))
    pad = max(len(k) for k, _ in rows) + 1
    lines += [f"  {k + ':':<{pad}} {v}" for k, v in rows]
    return lines
