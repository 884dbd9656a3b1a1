"""Process-independent hashes: seeds and ids that every rank and every run computes alike."""

from __future__ import annotations

import hashlib


def stable_hash(*parts) -> int:
    """A process-independent 63-bit hash (Python's hash() is salted per process)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


def image_id_to_int(image_id) -> int:
    """Image ids may be strings ('coco_123'); ITC multi-positive targets need comparable integers."""
    if isinstance(image_id, int):
        return image_id
    s = str(image_id)
    return int(s) if s.isdigit() and len(s) < 18 else stable_hash("image_id", s)
