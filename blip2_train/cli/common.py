"""Shared CLI plumbing: config composition with one-line errors, run directories, logging, metrics.json."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from blip2_train.utils.errors import Blip2TrainError
from blip2_train.utils.io import write_json_atomic  # noqa: F401  (the CLI modules import it from here)

log = logging.getLogger("blip2_train")

RUN_DIR_ENV = "BLIP2_RUN_DIR"


CONFIG_MODULE = "blip2_train.conf"  # conf/ ships in the package (blip2_train/conf -> ../conf)


def config_dir() -> Path:
    """The shipped configs: `conf/` of a source checkout, or `blip2_train/conf` of an installed wheel."""
    import importlib

    return Path(importlib.import_module(CONFIG_MODULE).__file__).resolve().parent


# -- the run directory, as Hydra's hydra.run.dir ---------------------------------------------------------------
_stamp: list[str] = []
STAMP_ENV = "BLIP2_STAMP"


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of a process (Linux /proc), or None."""
    ticks = _pid_start(pid)
    try:
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
        return boot + int(ticks) / os.sysconf("SC_CLK_TCK") if ticks else None
    except (OSError, StopIteration, ValueError):
        return None


def launcher_run_id(across_nodes: bool = True) -> str | None:
    """The id every process of one launch shares, also after a requeue: SLURM's job id (with the step id, so
    two `srun` steps of one allocation are two runs), torchrun's rendezvous id. torchrun without `--rdzv-id` (and
    without --standalone) says "none": then the start time of the torchrun agent that forked this node's ranks,
    which the nodes of a multi-node launch do not share (refused unless `across_nodes` is False)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID", "")
        return f"{job}.{step}" if step.isdigit() else job
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return rdzv
    if rdzv == "none":
        nodes_differ = os.environ.get("WORLD_SIZE", "1") != os.environ.get("LOCAL_WORLD_SIZE", "1")
        if nodes_differ and across_nodes:  # each node's agent started at its own time: the nodes would name different directories
            from blip2_train.utils.errors import ConfigError

            raise ConfigError(
                f"torchrun spans several nodes (WORLD_SIZE={os.environ.get('WORLD_SIZE')}, LOCAL_WORLD_SIZE="
                f"{os.environ.get('LOCAL_WORLD_SIZE')}) without --rdzv-id, so the nodes cannot agree on a run "
                "directory: pass --rdzv-id=<id shared by the nodes, e.g. $SLURM_JOB_ID> or paths.output_dir=<dir>")
        started = _process_start_time(os.getppid())
        if started is not None:
            return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))
    return None


def run_stamp() -> str:
    """The run's name under <log_dir>/<task_name>/: the stamp a launching blip2 process exported (a sweep's jobs,
    wherever submitit runs them, and Lightning's rank processes share it), else the launcher's run id (every rank
    computes the same directory), else the start time; fixed for the process until the next CLI call."""
    if not _stamp:
        _stamp.append(os.environ.get(STAMP_ENV) or launcher_run_id() or time.strftime("%Y-%m-%d_%H-%M-%S"))
    return _stamp[0]


def default_run_dir(output_dir, log_dir, task_name) -> str:
    """paths.output_dir when set; else the directory this run's rank 0 chose ($BLIP2_RUN_DIR, inherited by the
    processes Lightning launches); else <log_dir>/<task_name>/<stamp>."""
    if output_dir:
        return str(output_dir)
    if os.environ.get(RUN_DIR_ENV):
        return os.environ[RUN_DIR_ENV]
    return str(Path(str(log_dir)) / str(task_name) / run_stamp())


def _original_cwd() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def _sweep_stamp() -> str:
    """hydra.sweep.dir's stamp. Hydra resolves it in single runs too, where it names nothing: a launch that
    cannot agree on a stamp is refused by the run directory (unless paths.output_dir names it), not here."""
    try:
        return run_stamp()
    except Blip2TrainError:
        return time.strftime("%Y-%m-%d_%H-%M-%S")


def _register_resolvers() -> None:
    new = {
        # W&B runs online only when the user configured it; otherwise offline, never a crash for lack of a key.
        "wandb_offline": lambda: os.environ.get("WANDB_MODE", "") != "online" and not os.environ.get("WANDB_API_KEY"),
        "blip2_run_dir": default_run_dir,
        "blip2_stamp": _sweep_stamp,
        # .hydra/ (the composed config) is written by rank 0 only: the other ranks would race on the same files
        "blip2_rank_zero": lambda value: value if is_rank_zero() else None,
        "blip2_cwd": _original_cwd,
    }
    for name, fn in new.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register() -> None:
    """What composition needs: our resolvers and the structured-config schemas."""
    from blip2_train.cli.schemas import register_schemas

    _register_resolvers()
    register_schemas()


def describe_config_error(e: BaseException) -> str:
    """Hydra/OmegaConf errors -> one line naming the key."""
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

    chain, cur = [], e
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for c in chain:
        key = getattr(c, "full_key", None)
        m = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(c))
        if m:
            key = m.group(1)
        if isinstance(c, MissingMandatoryValue) or m:
            return f"missing required config value '{key}' (set it on the command line: {key}=...)"
        if isinstance(c, ConfigKeyError):
            return _unknown_key_line(str(key))
        if isinstance(c, ValidationError):
            return describe_type_error(c, key)
    text = str(e)
    everything = " ".join(str(c) for c in chain)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and not re.search(r"could not be converted|Validation|is not a valid", everything):
        return _unknown_key_line(m.group(1))
    m = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if m:
        return f"unknown config option '{m.group(1)}' ({text.strip().splitlines()[0]})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _unknown_key_line(key: str) -> str:
    from blip2_train.cli.schemas import SCHEMAS

    group, _, rest = key.partition(".")
    if group in SCHEMAS and rest and "." not in rest:  # the group's keys are its target's arguments
        return f"unknown config key '{key}' (check the spelling: the keys of '{group}' are its target's arguments)"
    return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=...)"


_TYPE_WORDS = {"Integer": "int", "Float": "float", "String": "str", "Boolean": "bool"}


def describe_type_error(c: BaseException, key: str | None) -> str:
    """A schema's ValidationError -> `config value data.batch_size='abc' must be int (str given)`."""
    msg = str(c).splitlines()[0]
    m = re.search(r"could not be converted to (\w+)|is not a valid (\w+)", msg)
    value = getattr(c, "value", None)
    if m and key:
        want = _TYPE_WORDS.get(m.group(1) or m.group(2), m.group(1) or m.group(2))
        return f"config value {key}={value!r} must be {want} ({type(value).__name__} given)"
    return f"invalid value for config key '{key}': {msg}"


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The job config of `blip2-<config_name> <overrides>` without running it (tests, benchmarks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


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
        results.append(_run_sweep_job(cfg, body) if multirun else run_job(cfg, body))
        return results[-1]

    user_full_error = os.environ.get("BLIP2_FULL_ERROR") == "1" or (
        os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get(_OWN_FULL_ERROR))
    saved_argv = sys.argv
    saved_env = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", _OWN_FULL_ERROR, RUN_DIR_ENV, STAMP_ENV)}
    sys.argv = [saved_argv[0], *argv]
    if not user_full_error:  # Hydra then raises, and we print the one line
        os.environ.update({"HYDRA_FULL_ERROR": "1", _OWN_FULL_ERROR: "1"})
    _stamp.clear()
    # One stamp for the whole launch: a sweep's jobs (in this process, or wherever submitit runs them: they
    # inherit this environment) and the rank processes Lightning starts resolve the same directories.
    # A launch whose nodes cannot agree on a stamp (torchrun over nodes without --rdzv-id) is refused later, by
    # the run directory's resolver, and only if no paths.output_dir names the directory.
    try:
        os.environ[STAMP_ENV] = run_stamp()
    except Blip2TrainError:
        _stamp.clear()
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
    for result in results:
        if result and result.get("output_dir") and is_rank_zero():
            print(f"output directory: {result['output_dir']}")
    return 0


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
    try:
        return run_job(cfg, body)
    finally:
        sys.argv = saved_argv
        release_run_locks()
        close_log_files()
        _end_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def _end_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
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
    from blip2_train.utils.config_ranges import check_ranges

    created = adopt_hydra_run_dir(cfg)
    try:
        refuse_unknown_keys(cfg)
        check_ranges(cfg)
        return body(cfg)
    except Exception:
        if created is not None and is_rank_zero():  # the other ranks never write .hydra/
            remove_if_only_hydra_files(created)
        raise


def refuse_unknown_keys(cfg: DictConfig) -> None:
    from blip2_train.cli.schemas import unknown_keys
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


def remove_if_only_hydra_files(run_dir: Path) -> None:
    import shutil

    if run_dir.is_dir() and all(p.name == ".hydra" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        try:
            run_dir.rmdir()
        except OSError:
            pass


def known_error_line(e: BaseException) -> str | None:
    """One line for configuration / input errors (ours, Hydra's, OmegaConf's, a missing file); None otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from hydra.errors import InstantiationException

    if isinstance(e, InstantiationException) and not any(isinstance(c, Blip2TrainError) for c in _causes(e)):
        # "Error in call to target 'X':\nTypeError(...)": the cause is on the last line
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        text = " ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)
        return text.replace("set env var HYDRA_FULL_ERROR=1 to see chained exception",
                            "BLIP2_FULL_ERROR=1 shows the traceback")
    if isinstance(e, (HydraException, OmegaConfBaseException, Blip2TrainError, FileNotFoundError)) or \
            any(isinstance(c, (OmegaConfBaseException, Blip2TrainError)) for c in _causes(e)):
        ours = e if isinstance(e, Blip2TrainError) else next(
            (c for c in _causes(e) if isinstance(c, Blip2TrainError)), None)  # e.g. wrapped by instantiate
        return first_line(ours) if ours is not None else describe_config_error(e)
    if isinstance(e, ValueError) and _raised_by_hydra(e):  # usage: "Only one of --run, --multirun, --cfg ..."
        return first_line(e)
    return None


def _raised_by_hydra(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}hydra{os.sep}" in tb.tb_frame.f_code.co_filename


def first_line(e: BaseException) -> str:
    """The message's first line; for an error re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0." + the worker's traceback), the worker's own message."""
    text = str(e)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [l for l in text.splitlines() if l.strip()][-1]
        return re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return text.splitlines()[0] if text else type(e).__name__


def _causes(e: BaseException):
    cur, n = e.__cause__ or e.__context__, 0
    while cur is not None and n < 6:
        yield cur
        cur, n = cur.__cause__ or cur.__context__, n + 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (a redirect, a test's capture), not to the
    stream of the time logging was set up, which may be closed by then."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging() -> None:
    level = os.environ.get("BLIP2_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("transformers", "lightning.pytorch.utilities.rank_zero", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", 0)))) == 0


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


_file_handlers: list[logging.Handler] = []


def log_to_file(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    _file_handlers.append(handler)


def close_log_files() -> None:
    while _file_handlers:
        h = _file_handlers.pop()
        logging.getLogger().removeHandler(h)
        h.close()


# -- one run per output directory ---------------------------------------------------------------------------
# Two runs writing into one directory interleave metrics.csv and leave one run's last.ckpt beside the other's
# config.yaml. Rank 0 takes `<run_dir>/.run.lock` (host, pid, start time) before writing anything; the other
# ranks of the same run never take it (they are not rank 0), so they are not refused by their own rank 0.
LOCK_NAME = ".run.lock"
_held: list[Path] = []


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    start = _pid_start(pid)
    return not (holder.get("pid_start") and start and start != holder["pid_start"])  # else: pid reused


def _read_lock(path: Path) -> dict | None:
    for _ in range(20):  # the holder may be between creating the file and writing it
        try:
            holder = json.loads(path.read_text())
            if isinstance(holder, dict) and "pid" in holder:
                return holder
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def acquire_run_lock(run_dir: Path) -> None:
    """Take `run_dir`'s lock or raise ConfigError naming its holder. A lock left by a dead process on this host
    (a killed run) is taken over; a lock held by this process is re-entered."""
    from blip2_train.utils.errors import ConfigError

    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    job = launcher_run_id(across_nodes=False)  # who holds the lock: a per-node id is enough
    me = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "job": job,
          "pid_start": _pid_start(os.getpid())}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is not None and holder.get("host") == host and holder["pid"] == os.getpid():
                return
            # a job requeued onto another node (same SLURM job id) succeeds itself; on this host the pid tells
            requeued = holder is not None and holder.get("host") != host and job is not None and holder.get("job") == job
            if holder is not None and not requeued and (holder.get("host") != host or _holder_alive(holder)):
                raise ConfigError(
                    f"{run_dir} is in use by another run (pid {holder['pid']} on {holder.get('host')}, started "
                    f"{holder.get('started')}): wait for it to end, or choose another paths.output_dir (if that run "
                    f"is gone, delete {path})")
            log.warning("taking over the stale lock %s (%s)", path,
                        "unreadable" if holder is None else f"an earlier attempt of job {job}" if requeued
                        else f"pid {holder['pid']} on this host is gone")
            if _read_lock(path) != holder:
                continue  # someone else took it over meanwhile
            try:  # a rename is atomic: of two processes taking over the same stale lock, one wins
                os.replace(path, path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}"))
                path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}").unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held.append(path)
        return
    raise ConfigError(f"could not take the lock {path}: other runs keep taking it")


def release_run_locks() -> None:
    while _held:
        path = _held.pop()
        holder = _read_lock(path) if path.exists() else None
        if holder is not None and holder.get("pid") == os.getpid():
            path.unlink(missing_ok=True)


atexit.register(release_run_locks)


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
