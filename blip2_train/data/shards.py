"""Writing WebDataset tar shards from annotations + images, resumable, incremental and parallel.

Each sample: `<key>.jpg` (image bytes), `<key>.json` (`{"caption": str | [str], "image_id": str, "image": path}`)
and `<key>.txt` (first caption; what img2dataset readers expect). One sample per image: an image's captions
travel together and one is drawn per step (CapFilt-style), so image bytes are never duplicated.

A record of an instruction format has question/answer pairs instead: its `.json` is `{"qa": [pair, ...],
"image_id", "image"}` (each pair `{"instruction", "answer", "task"?}` or `{"question", "answers": [...],
"question_id"?}`, see `annotations`; one drawn per step by `instruct.InstructionDecoder`) and its `.txt` the
first pair's (first) answer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from blip2_train.data.annotations import ImageRecord
from blip2_train.data.transforms import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from blip2_train.utils.io import write_json_atomic

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
            qa = [p for p in rec.get("qa") or [] if usable_pair(p)]
            if not captions and not qa:
                why = "no usable question/answer pair" if rec.get("qa") else "no non-empty caption"
                rejects.append({"image": rec["image"], "image_id": rec["image_id"], "reason": why})
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
            meta = {"caption": captions if len(captions) > 1 else captions[0]} if captions else {}
            meta.update({"qa": qa} if qa else {}, image_id=rec["image_id"], image=rec["image"])
            _add(tar, f"{key}.jpg", data, mtime)
            _add(tar, f"{key}.json", json.dumps(meta).encode(), mtime)
            _add(tar, f"{key}.txt", (captions[0] if captions else first_answer(qa[0])).encode(), mtime)
            written += 1
    os.replace(tmp, out_path)
    return {"name": os.path.basename(out_path), "num_samples": written, "bytes": os.path.getsize(out_path),
            "rejects": rejects}


def usable_pair(pair) -> bool:
    """A ready-made instruction with its answer, or a question with at least one answer."""
    if not isinstance(pair, dict):
        return False
    if "instruction" in pair:
        return all(isinstance(pair.get(k), str) and pair[k].strip() for k in ("instruction", "answer"))
    answers = pair.get("answers")
    return isinstance(pair.get("question"), str) and bool(pair["question"].strip()) and isinstance(answers, list) \
        and any(isinstance(a, str) and a.strip() for a in answers)


def first_answer(pair: dict) -> str:
    """A usable pair's answer, or its first non-empty one: the sample's `.txt`."""
    if "instruction" in pair:
        return pair["answer"]
    return next(a for a in pair["answers"] if isinstance(a, str) and a.strip())


def _write_shard_job(args):
    return write_shard(*args)


# Bump when write_shard's sample layout changes: every shard built before then is rebuilt on the next run.
SHARD_LAYOUT = "jpg+json+txt, one sample per image, non-JPEG re-encoded at quality 95"


def shard_fingerprint(records: list[dict], max_pixels: int) -> str:
    """What a shard's bytes are made of, short of the image files: its records (image path, image id, every
    caption, in order, and their question/answer pairs), the sample layout and the options that change what is
    written (`max_pixels` decides which images are rejected). Equal fingerprints: the shard would be written
    again the same. The pairs enter only a record that has some, so caption shards keep the fingerprints they
    were built with before records had pairs (no rebuild of them)."""
    h = hashlib.sha256(json.dumps({"layout": SHARD_LAYOUT, "max_pixels": int(max_pixels)}).encode())
    for r in records:
        row = [r["image"], r["image_id"], list(r["captions"])] + ([r["qa"]] if r.get("qa") else [])
        h.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:32]


def _read_marker(marker: Path) -> dict | None:
    try:
        entry = json.loads(marker.read_text())
    except (OSError, ValueError):  # absent, or cut short by a kill while it was written
        return None
    return entry if isinstance(entry, dict) else None


def _rebuild_reason(entry: dict, fingerprint: str, tar: Path, image_root: str) -> str | None:
    """Why a shard already on disk cannot be kept for these records, or None when it can."""
    if "fingerprint" not in entry:
        return "built without a fingerprint (by an older build_shards.py)"
    if entry["fingerprint"] != fingerprint:
        return "records changed"
    if tar.stat().st_size != entry.get("bytes"):
        return "tar size differs from its record"
    for r in entry.get("rejects", []):
        if str(r.get("reason", "")).startswith("missing file") and os.path.exists(os.path.join(image_root, r["image"])):
            return "a rejected missing image now exists"
    return None


def _stale_shards(out_dir: Path, prefix: str, keep: set[str], old_manifest: dict | None) -> list[str]:
    """Shards this builder wrote into `out_dir` that the current records no longer make: past the last chunk
    (fewer records), or under the previous manifest's prefix. Other files are left alone."""
    ours = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    names = {p.name for p in out_dir.glob(f"{prefix}-*.tar") if ours.fullmatch(p.name)}
    names |= {p.name[: -len(".done.json")] for p in out_dir.glob(f"{prefix}-*.tar.done.json")
              if ours.fullmatch(p.name[: -len(".done.json")])}
    listed = (old_manifest or {}).get("shards")
    for e in listed if isinstance(listed, list) else []:
        name = str(e.get("name", "")) if isinstance(e, dict) else ""
        if name and Path(name).name == name and name.endswith(".tar"):
            names.add(name)
    return sorted(names - keep)


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
    """Shard `records` by sample count into `out_dir`, keeping the shards already built from the same records.

    Each shard's `.done.json` marker (written after the tar is renamed into place) and its manifest entry hold
    the fingerprint of the records it was built from (`shard_fingerprint`). A re-run keeps a shard whose
    fingerprint, size and missing images are unchanged, rebuilds any other one (atomically: temp file + rename,
    so a build killed mid-shard redoes exactly that shard), removes the shards past the last one (fewer
    records), and rewrites `manifest.json` and `rejects.jsonl` to match. Image files edited in place are not
    seen: delete a shard's `.tar` to rebuild it. Returns the manifest plus `build`: what this run did
    (`new`, `rebuilt`, `kept`, `removed` counts and `reasons`: shard names by why each was rebuilt).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    old_manifest = _read_marker(out_dir / "manifest.json")
    chunks = [records[i : i + shard_size] for i in range(0, len(records), shard_size)]
    names = [SHARD_PATTERN.format(prefix=prefix, index=idx) for idx in range(len(chunks))]
    jobs, done_entries, fingerprints, reasons = [], {}, {}, {}
    for idx, chunk in enumerate(chunks):
        name, recs = names[idx], [asdict(r) for r in chunk]
        fingerprints[idx] = shard_fingerprint(recs, max_pixels)
        entry, tar = _read_marker(out_dir / (name + ".done.json")), out_dir / name
        if entry is not None and tar.exists():
            why = _rebuild_reason(entry, fingerprints[idx], tar, str(image_root))
            if why is None:
                done_entries[idx] = entry
                continue
        elif tar.exists():
            why = "no .done.json marker (a build stopped before it)"
        elif entry is not None:
            why = "tar missing"
        else:
            why = None  # a new shard
        if why is not None:
            reasons.setdefault(why, []).append(name)
        # the old marker goes first: a build killed after the new tar is in place but before its marker leaves
        # a tar without one (rebuilt next time), never the new tar under the old records' fingerprint
        (out_dir / (name + ".done.json")).unlink(missing_ok=True)
        jobs.append((idx, (recs, str(image_root), str(out_dir / name), max_pixels)))

    def finish(idx, entry):
        entry["fingerprint"] = fingerprints[idx]
        write_json_atomic(out_dir / (entry["name"] + ".done.json"), entry, sort_keys=False)
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

    removed = _stale_shards(out_dir, prefix, set(names), old_manifest)
    for name in removed:
        for path in (out_dir / name, out_dir / (name + ".done.json")):
            path.unlink(missing_ok=True)

    shards = [done_entries[i] for i in sorted(done_entries)]
    rejects = [r for s in shards for r in s["rejects"]]
    tmp = out_dir / "rejects.jsonl.tmp"
    with open(tmp, "w") as f:
        for r in rejects:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out_dir / "rejects.jsonl")
    manifest = {
        "source": source,
        "prefix": prefix,
        "shard_size": shard_size,
        "max_pixels": max_pixels,
        "num_images_in": len(records),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_captions": sum(len([c for c in r.captions if c and c.strip()]) for r in records),
        "num_pairs": sum(len([p for p in r.qa if usable_pair(p)]) for r in records),
        "num_rejected": len(rejects),
        "num_shards": len(shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "shards": [{k: s[k] for k in ("name", "num_samples", "bytes", "fingerprint")} for s in shards],
    }
    write_json_atomic(out_dir / "manifest.json", manifest, sort_keys=False)
    rebuilt = sum(len(v) for v in reasons.values())
    build = {"new": len(jobs) - rebuilt, "rebuilt": rebuilt, "kept": len(chunks) - len(jobs), "removed": len(removed),
             "reasons": reasons}
    return {**manifest, "build": build}


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
    """(samples, bytes) of each shard, from the manifest.json beside it (written by `build_shards`); None when a
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
