"""Writing WebDataset tar shards from annotations + images, resumable and parallel.

Each sample: `<key>.jpg` (image bytes), `<key>.json` (`{"caption": str | [str], "image_id": str, "image": path}`)
and `<key>.txt` (first caption; what img2dataset readers expect). One sample per image: an image's captions
travel together and one is drawn per step (CapFilt-style), so image bytes are never duplicated.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from blip2_train.data.annotations import ImageRecord
from blip2_train.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

SHARD_PATTERN = "{prefix}-{index:06d}.tar"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def validate_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Decode fully (catches truncation); re-encode non-JPEG inputs as JPEG so shards hold only `.jpg`."""
    img = decode_image(data, max_pixels=max_pixels)
    if data[:3] == b"\xff\xd8\xff":
        return data
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95)
    return out.getvalue()


def write_shard(
    records: list[dict], image_root: str, out_path: str, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict:
    """Write one shard atomically (temp file + rename). Returns its manifest entry with rejects."""
    rejects, written, mtime = [], 0, time.time()
    tmp = out_path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for rec in records:
            captions = [c for c in rec["captions"] if c and c.strip()]
            if not captions:
                rejects.append({"image": rec["image"], "image_id": rec["image_id"], "reason": "no non-empty caption"})
                continue
            path = os.path.join(image_root, rec["image"])
            try:
                with open(path, "rb") as f:
                    data = validate_image_bytes(f.read(), max_pixels=max_pixels)
            except FileNotFoundError:
                rejects.append({"image": rec["image"], "image_id": rec["image_id"], "reason": f"missing file {path}"})
                continue
            except ImageDecodeError as e:
                rejects.append({"image": rec["image"], "image_id": rec["image_id"], "reason": str(e)})
                continue
            key = f"{rec['image_id']}".replace(".", "_").replace("/", "_")
            key = f"{written:06d}_{key}"  # unique even if image ids repeat across sources
            meta = {"caption": captions if len(captions) > 1 else captions[0], "image_id": rec["image_id"],
                    "image": rec["image"]}
            _add(tar, f"{key}.jpg", data, mtime)
            _add(tar, f"{key}.json", json.dumps(meta).encode(), mtime)
            _add(tar, f"{key}.txt", captions[0].encode(), mtime)
            written += 1
    os.replace(tmp, out_path)
    return {"name": os.path.basename(out_path), "num_samples": written, "bytes": os.path.getsize(out_path),
            "rejects": rejects}


def _write_shard_job(args):
    return write_shard(*args)


def build_shards(
    records: list[ImageRecord],
    image_root: str | Path,
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    shard_size: int = 1000,
    workers: int = 1,
    source: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> dict:
    """Shard `records` by sample count into `out_dir`; skip shards already complete (resume).

    A shard is complete when its `.done.json` marker exists: it is written after the tar is renamed into
    place, so a build killed mid-shard redoes exactly that shard. Writes `manifest.json` and `rejects.jsonl`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
    jobs, done_entries = [], {}
    for idx, chunk in enumerate(chunks):
        name = SHARD_PATTERN.format(prefix=prefix, index=idx)
        marker = out_dir / (name + ".done.json")
        if marker.exists() and (out_dir / name).exists():
            done_entries[idx] = json.loads(marker.read_text())
            continue
        jobs.append((idx, ([asdict(r) for r in chunk], str(image_root), str(out_dir / name), max_pixels)))

    def finish(idx, entry):
        (out_dir / (entry["name"] + ".done.json")).write_text(json.dumps(entry))
        done_entries[idx] = entry

    bar = _progress(len(chunks), len(done_entries), progress)
    if workers <= 1:
        for idx, args in jobs:
            finish(idx, write_shard(*args))
            bar(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for (idx, _), entry in zip(jobs, pool.map(_write_shard_job, [a for _, a in jobs])):
                finish(idx, entry)
                bar(1)

    shards = [done_entries[i] for i in sorted(done_entries)]
    rejects = [r for s in shards for r in s["rejects"]]
    with open(out_dir / "rejects.jsonl", "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    manifest = {
        "source": source,
        "prefix": prefix,
        "num_images_in": len(records),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_captions": sum(len([c for c in r.captions if c and c.strip()]) for r in records),
        "num_rejected": len(rejects),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": [{k: s[k] for k in ("name", "num_samples", "bytes")} for s in shards],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="shard", desc="shards")
    return bar.update


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"no manifest.json in {shard_dir}")
    return json.loads(path.read_text())


def shard_sizes(urls: list[str]) -> dict[str, tuple[int, int]] | None:
    """(samples, bytes) of each shard, from the manifest.json beside it (written by `write_shards`); None when a
    shard has none (another tool's shards, remote URLs): a mid-epoch resume then reads what it skips."""
    by_dir: dict[str, dict] = {}
    out = {}
    for u in urls:
        d, name = os.path.split(u)
        if d not in by_dir:
            try:
                by_dir[d] = {e["name"]: e for e in read_manifest(d or ".")["shards"]}
            except (FileNotFoundError, KeyError, TypeError, ValueError):
                return None
        e = by_dir[d].get(name)
        if e is None or "num_samples" not in e or "bytes" not in e:
            return None
        out[u] = (int(e["num_samples"]), int(e["bytes"]))
    return out


def make_jpeg(img: Image.Image, quality: int = 92) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()
