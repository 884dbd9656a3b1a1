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


def config_dir() -> Path:
    """`conf/` at the repository root (the package is installed editable), or $BLIP2_CONF_DIR."""
    env = os.environ.get("BLIP2_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "conf"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("wandb_offline"):
        # W&B runs online only when the user configured it; otherwise offline, never a crash for lack of a key.
        OmegaConf.register_new_resolver(
            "wandb_offline",
            lambda: os.environ.get("WANDB_MODE", "") != "online" and not os.environ.get("WANDB_API_KEY"))


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
            return f"unknown config key '{key}' (check the spelling; to add a new key use +{key}=...)"
        if isinstance(c, ValidationError):
            return f"invalid value for config key '{key}': {str(c).splitlines()[0]}"
    text = str(e)
    everything = " ".join(str(c) for c in chain)
    m = re.search(r"Could not override '([^']+)'", text)
    if m and not re.search(r"could not be converted|Validation", everything):
        return f"unknown config key '{m.group(1)}' (check the spelling; to add a new key use +{m.group(1)}=...)"
    m = re.search(r"Could not (?:find|load) '([^']+)'", text)
    if m:
        return f"unknown config option '{m.group(1)}' ({text.strip().splitlines()[0]})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def run_cli(config_name: str, body: Callable[[DictConfig], dict], argv: list[str] | None = None) -> int:
    """Compose, run `body(cfg)`, print the output directory. Known errors -> one line on stderr, exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {Path(sys.argv[0]).name} [key=value ...] [experiment=NAME]\n"
              f"Hydra overrides on conf/{config_name}.yaml; experiments: "
              + ", ".join(sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))))
        return 0
    setup_logging()
    try:
        from blip2_train.utils.config_ranges import check_ranges

        cfg = compose(config_name, argv)
        check_ranges(cfg)  # before any work: nothing created, nothing written
        result = body(cfg)
    except Exception as e:  # noqa: BLE001 - turned into one readable line below
        if os.environ.get("BLIP2_FULL_ERROR") or os.environ.get("HYDRA_FULL_ERROR"):
            raise
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, (HydraException, OmegaConfBaseException, Blip2TrainError, FileNotFoundError)) or \
                any(isinstance(c, (OmegaConfBaseException, Blip2TrainError)) for c in _causes(e)):
            ours = e if isinstance(e, Blip2TrainError) else next(
                (c for c in _causes(e) if isinstance(c, Blip2TrainError)), None)  # e.g. wrapped by instantiate
            msg = first_line(ours) if ours is not None else describe_config_error(e)
            print(f"error: {msg}", file=sys.stderr)
            return 2
        raise
    finally:
        release_run_locks()
    if result is not None and result.get("output_dir") and is_rank_zero():
        print(f"output directory: {result['output_dir']}")
    return 0


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


def setup_logging() -> None:
    level = os.environ.get("BLIP2_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "lightning.pytorch.utilities.rank_zero", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", os.environ.get("SLURM_PROCID", 0)))) == 0


def resolve_run_dir(cfg: DictConfig) -> Path:
    """One output directory per run, also under DDP.

    Explicit `paths.output_dir` wins. Otherwise rank 0 picks `<paths.log_dir>/<task>/<time>` and exports it in
    $BLIP2_RUN_DIR, which the processes that Lightning launches inherit; under torchrun/SLURM, where all ranks
    start at once, the launcher's run id names the directory so that every rank computes the same one.
    """
    if cfg.paths.get("output_dir"):
        run_dir = Path(cfg.paths.output_dir)
    elif os.environ.get(RUN_DIR_ENV):
        run_dir = Path(os.environ[RUN_DIR_ENV])
    else:
        launcher_id = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID")
        stamp = launcher_id if launcher_id and launcher_id != "none" else time.strftime("%Y-%m-%d_%H-%M-%S")
        run_dir = Path(cfg.paths.log_dir) / str(cfg.get("task_name", "run")) / stamp
    run_dir = run_dir.resolve()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        acquire_run_lock(run_dir)
    return run_dir


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


def _launcher_job_id() -> str | None:
    for var in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        v = os.environ.get(var)
        if v and v != "none":
            return f"{var}={v}"
    return None


def acquire_run_lock(run_dir: Path) -> None:
    """Take `run_dir`'s lock or raise ConfigError naming its holder. A lock left by a dead process on this host
    (a killed run) is taken over; a lock held by this process is re-entered."""
    from blip2_train.utils.errors import ConfigError

    path = run_dir / LOCK_NAME
    host = socket.gethostname()
    job = _launcher_job_id()
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
        check_types(node, target)
    return instantiate(node, **kwargs)


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def check_types(node: DictConfig, target: str) -> None:
    """Values given for parameters annotated int/float/bool/str (optionally `| None`) must have that type, so
    `data.batch_size=abc` is one line naming the key instead of a traceback deep inside training."""
    import inspect
    import typing

    from hydra.utils import get_object

    from blip2_train.utils.errors import ConfigError

    try:
        obj = get_object(target)
        sig = inspect.signature(obj)
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - third-party targets without usable hints are not checked
        return
    prefix = node._get_full_key("") if hasattr(node, "_get_full_key") else ""
    for name in sig.parameters:
        if name not in node or name not in hints:
            continue
        value = node._get_node(name)._value() if hasattr(node, "_get_node") else node[name]
        if value is None or OmegaConf.is_config(value) or (isinstance(value, str) and "${" in value):
            continue
        try:
            value = node[name]
        except Exception:  # noqa: BLE001 - an unresolvable interpolation is reported elsewhere
            continue
        hint = hints[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
            typing.Union, getattr(__import__("types"), "UnionType", typing.Union)) else [hint]
        allowed = tuple(t for a in args for t in _SIMPLE.get(a, ()))
        if len(allowed) != sum(len(_SIMPLE.get(a, ())) for a in args) or not allowed:
            continue  # a hint we do not check (lists, dicts, objects)
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            key = f"{prefix}.{name}" if prefix else name
            want = " or ".join(sorted({a.__name__ for a in args}))
            raise ConfigError(f"config value {key}={value!r} must be {want} ({type(value).__name__} given)")
