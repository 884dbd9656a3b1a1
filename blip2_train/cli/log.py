"""Console and run-directory logging for the CLI."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


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
    handler = next((h for h in root.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    # the handler filters too: `--info` turns Hydra's loggers to DEBUG and prints their lines itself
    handler.setLevel(level)
    root.setLevel(level)
    for noisy in ("transformers", "lightning.pytorch.utilities.rank_zero", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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


def adopt_library_logging() -> None:
    """Library output through our handlers only, once the libraries are imported: Lightning puts its own stderr
    handler on the `lightning` logger, so each of its lines came twice (plain and ours). Two warnings every run
    printed say nothing about the run: Lightning's use of a deprecated torch pytree API, and the IterableDataset
    length warning, whose case cannot arise here (every worker of the training stream yields the same count of
    batches: data/stream.py)."""
    import warnings

    lib = logging.getLogger("lightning")
    for h in list(lib.handlers):
        if type(h) is logging.StreamHandler:
            lib.removeHandler(h)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined")
