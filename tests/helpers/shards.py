"""Tar shards written by hand: for bad members and shapes that build_shards never writes."""

from __future__ import annotations

import io
import tarfile


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
