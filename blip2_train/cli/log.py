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
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
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

