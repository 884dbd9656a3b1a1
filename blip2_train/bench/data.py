"""`blip2-bench data`: the training loader's throughput against plain PIL decoding, and what a mid-epoch resume
costs (reading skipped samples, or replaying them over sample positions)."""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

from blip2_train.bench.doc import machine, write_section
from blip2_train.utils.errors import ConfigError

# Real photographs shipped inside scikit-image (no download): colour ones, and the grey camera man.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry", "camera")


def photo_like_shards(out_dir: Path, n: int, seed: int = 0) -> list[str]:
    """n photo-like 640x480 JPEGs (random 4:3 crops of scikit-image's photographs, resized, quality 90) in
    shards of 100: decoding cost as real web photos, unlike flat synthetic images."""
    import json
    import random
    import tarfile

    try:
        import skimage.data
    except ImportError:
        raise ConfigError("--photo-like needs scikit-image: pip install 'blip2-train[bench]'") from None
    from PIL import Image

    from blip2_train.data.shards import make_jpeg

    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
    rng, urls = random.Random(seed), []
    out_dir.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, 100):
        urls.append(str(out_dir / f"photo-{start // 100:06d}.tar"))
        with tarfile.open(urls[-1], "w") as tar:
            for i in range(start, min(n, start + 100)):
                img = photos[i % len(photos)]
                w = int(img.width * rng.uniform(0.6, 1.0))
                h = min(img.height, int(w * 3 / 4))
                w = int(h * 4 / 3)
                x, y = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
                jpg = make_jpeg(img.resize((640, 480), Image.LANCZOS, box=(x, y, x + w, y + h)), quality=90)
                meta = json.dumps({"caption": f"a photograph number {i}", "image_id": i}).encode()
                for ext, data in (("jpg", jpg), ("json", meta)):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return urls


def bench_data(a) -> None:
    import tempfile

    import torch
    from PIL import Image
    from webdataset.tariterators import tarfile_samples

    from blip2_train.data.collate import CaptionCollator
    from blip2_train.data.datamodule import expand_urls
    from blip2_train.data.decode import SampleDecoder
    from blip2_train.data.stream import ShardStream, Source
    from blip2_train.data.transforms import TrainTransform
    from blip2_train.models.tokenizer import load_qformer_tokenizer

    torch.set_num_threads(1)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    n_images = a.batches * a.batch_size
    if a.photo_like:
        tmp = tempfile.TemporaryDirectory()
        urls = photo_like_shards(Path(tmp.name), a.photo_like)
        what = f"--photo-like {a.photo_like}"
    else:
        urls, what = expand_urls(a.shards), f"--shards {a.shards}"

    def decode_only() -> float:
        n, t0 = 0, time.perf_counter()
        while n < n_images:
            for s in tarfile_samples({"url": u} for u in urls):
                Image.open(io.BytesIO(s["jpg"])).convert("RGB")
                n += 1
                if n >= n_images:
                    break
        return n / (time.perf_counter() - t0)

    tok = load_qformer_tokenizer(a.tokenizer)

    def stream(fast: bool, batches: int, shards=None) -> ShardStream:
        dec = SampleDecoder(TrainTransform(a.image_size, resize="torch" if fast else "pil"), jpeg_draft=fast)
        return ShardStream([Source("bench", urls, shards=shards)], dec, CaptionCollator(tok), a.batch_size,
                           resampled=True, shuffle_buffer=100, batches_per_epoch=batches)

    def loader(fast: bool) -> float:
        it = iter(stream(fast, a.batches + 1))
        next(it)  # warm-up: shuffle buffer fill
        t0, n = time.perf_counter(), 0
        for b in it:
            n += b["image"].shape[0]
        return n / (time.perf_counter() - t0)

    # the best of 3 interleaved rounds: on a shared machine the load changes between measurements
    rounds = [(decode_only(), loader(fast=True), loader(fast=False)) for _ in range(a.rounds)]
    base, full, exact = (max(r[i] for r in rounds) for i in range(3))
    rows = [("PIL decode only (Image.open + convert RGB, full size)", base),
            ("loader: decode + RandomResizedCrop + flip + normalize + tokenize (default: JPEG draft for the "
             "crop, torch antialiased bicubic on uint8)", full),
            ("loader, full-size decode and PIL bicubic resize (the exact path, box drawn in source pixels)",
             exact)]
    size = Image.open(io.BytesIO(next(iter(tarfile_samples([{"url": urls[0]}])))["jpg"])).size
    kb = sum(os.path.getsize(u) for u in urls) / 1024 / sum(1 for u in urls for _ in tarfile_samples([{"url": u}]))
    cmd = f"blip2-bench data {what} --batches {a.batches} --batch-size {a.batch_size} --image-size {a.image_size}"
    body = [f"## Data loader (`blip2-bench data {what.split()[0]}`)\n",
            f"Command: `{cmd}{f' --resume-skip {a.resume_skip}' if a.resume_skip else ''}`  ",
            f"Machine: {machine()}; one worker process (one core); source JPEGs {size[0]}x{size[1]}, "
            f"{kb:.0f} KiB per sample in the tar; best of {a.rounds} interleaved rounds; load average before: "
            f"{load}.\n",
            "| pipeline | images/s per worker | vs decode-only |", "| --- | ---: | ---: |"]
    for name, v in rows:
        body.append(f"| {name} | {v:.0f} | {v / base:.2f}x |")
    if a.resume_skip:
        def resume_seconds(shards) -> float:  # to the first batch after the skipped ones, less its own decoding
            s = stream(True, a.resume_skip + 1, shards)
            s.skip_batches = a.resume_skip
            t0 = time.perf_counter()
            next(iter(s))
            return max(1e-9, time.perf_counter() - t0 - a.batch_size / full)

        skipped = a.resume_skip * a.batch_size
        # without shard counts the skipped batches' tar members are read (and shuffled), not decoded; with them
        # (manifest.json, as `blip2_train.data.shards` writes it) the shuffle is replayed over sample positions
        sizes = {u: (sum(1 for _ in tarfile_samples([{"url": u}])), os.path.getsize(u)) for u in urls}
        read_s, replay_s = min(resume_seconds(None) for _ in range(2)), min(resume_seconds(sizes) for _ in range(2))
        skip = skipped / read_s
        body += [f"| resume: skipping {a.resume_skip} batches, tar members read, not decoded (shards without a "
                 f"manifest) | {skip:.0f} | {skip / base:.2f}x |",
                 f"| resume: skipping {a.resume_skip} batches replayed over sample positions (manifest counts: only "
                 f"the shards still holding later samples are read) | {skipped / replay_s:.0f} | "
                 f"{skipped / replay_s / base:.2f}x |", "",
                 f"Resume, {skipped} samples skipped: {read_s:.2f} s reading them, {replay_s:.3f} s replaying "
                 f"(shuffle buffer 100, shards of {sum(c for c, _ in sizes.values()) / len(sizes):.0f} samples "
                 "drawn with replacement).", "",
                 resume_arithmetic(skip, exact, full, kb)]
    text = "\n".join(body)
    print(text)
    write_section("data-photo" if a.photo_like else "data", text, Path(a.doc))


def resume_arithmetic(skip_rate: float, exact: float, fast: float, kb: float, samples: float = 129e6,
                      gpus: int = 16, steps: int = 40_000, batch: int = 100, workers: int = 6,
                      buffer: int = 2000) -> str:
    """What a requeue `steps` into an epoch of `samples` costs each rank before it trains again."""
    per_rank = steps * batch
    per_worker = per_rank / workers
    return (f"Resume at real size: {samples / 1e6:.0f}M samples per epoch, {gpus} GPUs x data.batch_size {batch} = "
            f"{gpus * batch} samples per step ({samples / (gpus * batch) / 1e3:.1f}k steps per epoch); a requeue "
            f"{steps // 1000}k steps into it skips {per_rank / 1e6:.1f}M samples on every rank, "
            f"{per_worker / 1e3:.0f}k per worker ({workers} workers, one core each). Decoding and augmenting them "
            f"again: {per_worker / exact / 60:.0f} min at {exact:.0f} images/s per worker (full-size decode and PIL "
            f"resize; {per_worker / fast / 60:.0f} min with the default JPEG-draft transform); reading them without decoding: "
            f"{per_worker / skip_rate / 60:.1f} min at {skip_rate:.0f} samples/s per worker, as long as the "
            f"filesystem delivers {skip_rate * workers * kb / 1024:.0f} MiB/s per rank: that skip reads "
            f"{per_rank * kb / 2**20:.0f} GiB of tar per rank ({kb:.0f} KiB per sample). Replayed over sample "
            f"positions (shards with manifests, the default for shards this package writes), nothing skipped is "
            f"read but the shards still holding a sample that comes later: those of the shuffle buffer's oldest "
            f"resident, on average {buffer} x (ln {buffer} + 0.58) = {buffer * (math.log(buffer) + 0.577) / 1e3:.1f}k "
            f"samples back per worker at data.shuffle_buffer {buffer} (each draw replaces a uniform place), "
            f"{workers * buffer * (math.log(buffer) + 0.577) * kb / 2**20:.1f} GiB per rank plus a shard per "
            f"worker, and the positions themselves: {per_worker / 1e3:.0f}k integers per worker.")
