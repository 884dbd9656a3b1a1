"""Shared CLI plumbing: config composition with one-line errors, run directories, logging, metrics.json."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from blip2_train.utils.errors import Blip2TrainError

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
        cfg = compose(config_name, argv)
        result = body(cfg)
    except Exception as e:  # noqa: BLE001 - turned into one readable line below
        if os.environ.get("BLIP2_FULL_ERROR") or os.environ.get("HYDRA_FULL_ERROR"):
            raise
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(e, (HydraException, OmegaConfBaseException, Blip2TrainError, FileNotFoundError)) or \
                any(isinstance(c, (OmegaConfBaseException, Blip2TrainError)) for c in _causes(e)):
            print(f"error: {describe_config_error(e) if not isinstance(e, Blip2TrainError) else e}", file=sys.stderr)
            return 2
        raise
    if result is not None and result.get("output_dir") and is_rank_zero():
        print(f"output directory: {result['output_dir']}")
    return 0


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
    return run_dir


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(v):
    try:
        f = float(v)
        return None if math.isnan(f) else f
    except (TypeError, ValueError):
        return str(v)


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
