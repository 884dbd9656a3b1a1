"""Small file-writing helpers shared by the CLI and the evaluation code."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

# Why a write found no room: the device, a quota, or the process's file-size limit
NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EFBIG: "the file size limit (ulimit -f) is reached"}


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


def no_space_error(e: BaseException) -> OSError | None:
    """The OSError saying a write found no room, in `e` or the exceptions it chains (torch.save, for one, reports
    a failed write as a RuntimeError whose context holds it); None when `e` is about something else."""
    cur, seen = e, 0
    while cur is not None and seen < 8:
        if isinstance(cur, OSError) and cur.errno in NO_SPACE:
            return cur
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return None


def describe_no_space(err: OSError, path=None) -> str:
    """`no space left on the device writing <path> (12.0 MiB free in <dir>)`."""
    target = Path(path or err.filename or os.environ.get("BLIP2_RUN_DIR") or os.getcwd())
    where = next((d for d in (target, *target.parents) if d.is_dir()), Path("/"))
    free = shutil.disk_usage(where).free
    return f"{NO_SPACE[err.errno]} writing {target} ({human_bytes(free)} free in {where})"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
