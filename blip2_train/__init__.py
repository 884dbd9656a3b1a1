"""blip2-train: train BLIP-2 vision-language models (Q-Former stage 1, LLM stage 2).

Pipeline layout: data -> models (pure nn.Modules, losses as functions) -> lit (Lightning modules)
-> eval -> cli; `blip2_train.load` opens an export for use from Python.
"""

from blip2_train.utils.io import package_version

__version__ = package_version()


def load(path, device=None, dtype=None):
    """`blip2_train.api.load`: an export -> an object with caption / answer (stage 2) or score (stage 1)."""
    from blip2_train.api import load as _load

    return _load(path, device=device, dtype=dtype)
