"""Hydra composition of the shipped configs (`conf/`, packaged as `blip2_train.conf`): our resolvers, the
structured-config schemas, and `compose` for tools and tests that need a job config without running it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from blip2_train.config.run_dir import default_run_dir, run_stamp
from blip2_train.utils.errors import Blip2TrainError

CONFIG_MODULE = "blip2_train.conf"  # conf/ ships in the package (blip2_train/conf -> ../conf)


def config_dir() -> Path:
    """The shipped configs: `conf/` of a source checkout, or `blip2_train/conf` of an installed wheel."""
    import importlib

    return Path(importlib.import_module(CONFIG_MODULE).__file__).resolve().parent


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
        "blip2_cwd": _original_cwd,
    }
    for name, fn in new.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register() -> None:
    """What composition needs: our resolvers and the structured-config schemas."""
    from blip2_train.config.schemas import register_schemas

    _register_resolvers()
    register_schemas()


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The job config of `blip2-<config_name> <overrides>` without running it (tests, benchmarks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)

