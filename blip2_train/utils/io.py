"""Small file-writing helpers shared by the CLI and the evaluation code."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def write_json_atomic(path: Path, data, sort_keys: bool = True) -> None:
    """Write JSON through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=sort_keys, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(v):
    try:
        f = float(v)
        return None if math.isnan(f) else f
    except (TypeError, ValueError):
        return str(v)


def package_version() -> str:
    """The installed blip2-train's version (what an export records as its writer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blip2-train")
    except PackageNotFoundError:  # a source tree on sys.path without an install
        return "0+unknown"
