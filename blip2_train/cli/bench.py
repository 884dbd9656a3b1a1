"""`blip2-bench`: measured figures, printed and written to docs/benchmarks.md.

    blip2-bench data --shards data/bench/shards --batches 40 --batch-size 32 --image-size 224
    blip2-bench data --photo-like 400 --resume-skip 100 --tokenizer ...   (pip install '.[bench]')
    blip2-bench eval --arch tiny --tokenizer ... --annotation ... --image-root ...
    blip2-bench train --stage 1 --model stage1_vitg --batch-size 100          (GPU)
    blip2-bench train --stage 2 --arch tiny --llm tiny --batch-size 8 (CPU, CI-sized)
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

from blip2_train.utils.errors import ConfigError

BENCH_DOC = Path("docs/benchmarks.md")


def write_section(name: str, body: str, doc: Path = BENCH_DOC) -> None:
    """Replace (or append) the block between <!-- bench:NAME --> markers."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nFigures written by `blip2-bench`; each block names its command and machine.\n"
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_implementation()} {platform.python_version()}"


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
    from blip2_train.data.stream import SampleDecoder, ShardStream, Source
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
            ("loader, full-size decode and PIL bicubic resize (the pipeline before, box drawn in source pixels)",
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


def resume_arithmetic(skip_rate: float, before: float, now: float, kb: float, samples: float = 129e6,
                      gpus: int = 16, steps: int = 40_000, batch: int = 100, workers: int = 6,
                      buffer: int = 2000) -> str:
    """What a requeue `steps` into an epoch of `samples` costs each rank before it trains again."""
    per_rank = steps * batch
    per_worker = per_rank / workers
    return (f"Resume at real size: {samples / 1e6:.0f}M samples per epoch, {gpus} GPUs x data.batch_size {batch} = "
            f"{gpus * batch} samples per step ({samples / (gpus * batch) / 1e3:.1f}k steps per epoch); a requeue "
            f"{steps // 1000}k steps into it skips {per_rank / 1e6:.1f}M samples on every rank, "
            f"{per_worker / 1e3:.0f}k per worker ({workers} workers, one core each). Decoding and augmenting them "
            f"again, as before: {per_worker / before / 60:.0f} min at {before:.0f} images/s per worker (the old "
            f"pipeline; {per_worker / now / 60:.0f} min with the new transform); reading them without decoding: "
            f"{per_worker / skip_rate / 60:.1f} min at {skip_rate:.0f} samples/s per worker, as long as the "
            f"filesystem delivers {skip_rate * workers * kb / 1024:.0f} MiB/s per rank: that skip reads "
            f"{per_rank * kb / 2**20:.0f} GiB of tar per rank ({kb:.0f} KiB per sample). Replayed over sample "
            f"positions (shards with manifests, the default for shards this package writes), nothing skipped is "
            f"read but the shards still holding a sample that comes later: those of the shuffle buffer's oldest "
            f"resident, on average {buffer} x (ln {buffer} + 0.58) = {buffer * (math.log(buffer) + 0.577) / 1e3:.1f}k "
            f"samples back per worker at data.shuffle_buffer {buffer} (each draw replaces a uniform place), "
            f"{workers * buffer * (math.log(buffer) + 0.577) * kb / 2**20:.1f} GiB per rank plus a shard per "
            f"worker, and the positions themselves: {per_worker / 1e3:.0f}k integers per worker.")


def bench_eval(a) -> None:
    """Retrieval evaluation: our batched top-k/ITM protocol vs the reference's one-image-at-a-time ITM."""
    import torch
    from hydra.utils import instantiate

    from blip2_train.cli.common import compose
    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.eval.retrieval_baseline import evaluate_retrieval_one_at_a_time
    from blip2_train.eval.runner import evaluate_retrieval

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = compose("train", [f"arch={a.arch}", "model=stage1_vitg", f"paths.bert_dir={a.tokenizer}",
                            "paths.vision_checkpoint=null", "model.bert_checkpoint=null",
                            f"data.image_size={a.image_size}", *a.override])
    model = instantiate(cfg.model)
    if a.checkpoint:
        from blip2_train.models.build import load_stage1_weights

        load_stage1_weights(model, a.checkpoint)
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    dm = Blip2DataModule(a.tokenizer, eval_set={"annotation": a.annotation, "image_root": a.image_root,
                                          "limit": a.images},
                         eval_batch_size=64, num_workers=2, image_size=a.image_size)
    data = dm.eval_data()
    runs = {}
    for name in ("fast", "baseline", "fast"):  # fast twice: the first run pays warm-up costs
        loader = dm.eval_image_loader(0, 1)
        if name == "fast":
            runs[name] = evaluate_retrieval(model, data, loader, dm.tokenizer, (0, len(data)), a.k_test,
                                            a.pair_batch_size)
        else:
            runs[name] = evaluate_retrieval_one_at_a_time(model, data, loader, dm.tokenizer, a.k_test)
    fast, base = runs["fast"], runs["baseline"]
    keys = [k for k in fast if k.startswith(("txt_r", "img_r", "r_mean"))]
    same = all(abs(fast[k] - base[k]) < 1e-9 for k in keys)
    ratio = base["eval_seconds"] / fast["eval_seconds"]
    body = ["## Retrieval evaluation (`blip2-bench eval`)\n",
            f"Command: `blip2-bench eval --arch {a.arch} --annotation {a.annotation} --images {a.images} "
            f"--k-test {a.k_test} --image-size {a.image_size}`  ",
            f"Machine: {machine()}, device {device}, {torch.get_num_threads()} threads; {len(data)} images x "
            f"{len(data.texts)} texts, k_test {a.k_test}, arch `{a.arch}`.\n",
            "| protocol | seconds (encode + ITC + ITM re-rank) | txt_r1 | img_r1 | r_mean |", "| --- | ---: | ---: | ---: | ---: |",
            f"| reference: one ITM forward per image, then per text (dense -100 matrices) | {base['eval_seconds']:.2f} | "
            f"{base['txt_r1']:.2f} | {base['img_r1']:.2f} | {base['r_mean']:.2f} |",
            f"| blip2-train: unique candidate pairs, batches of {a.pair_batch_size}, no dense matrix | "
            f"{fast['eval_seconds']:.2f} | {fast['txt_r1']:.2f} | {fast['img_r1']:.2f} | {fast['r_mean']:.2f} |",
            f"\n**Speed-up {ratio:.1f}x; metrics {'identical' if same else 'DIFFERENT'}.**"]
    text = "\n".join(body)
    print(text)
    write_section(f"eval-{a.arch}", text)
    if not same:
        raise SystemExit("metrics differ between the two protocols")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip2-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="loader throughput vs plain PIL decode")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a shard directory, glob or brace pattern")
    src.add_argument("--photo-like", type=int, metavar="N",
                     help="N photo-like 640x480 JPEGs made from scikit-image's photographs (pip install '.[bench]')")
    d.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    d.add_argument("--batches", type=int, default=40)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is kept")
    d.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    d.add_argument("--resume-skip", type=int, default=0, metavar="N",
                   help="also time a resume that skips N batches (read, not decoded) against decoding")
    e = sub.add_parser("eval", help="retrieval evaluation: batched protocol vs one-image-at-a-time ITM")
    e.add_argument("--arch", default="tiny", help="a conf/arch/ config (random init unless --checkpoint)")
    e.add_argument("--checkpoint", help="stage-1 export directory or .pth to load")
    e.add_argument("--tokenizer", required=True, help="local BERT tokenizer directory")
    e.add_argument("--annotation", required=True, help="Karpathy-format test annotation")
    e.add_argument("--image-root", required=True)
    e.add_argument("--images", type=int, default=200)
    e.add_argument("--k-test", type=int, default=128)
    e.add_argument("--pair-batch-size", type=int, default=512)
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("override", nargs="*", help="extra Hydra overrides (arch.qformer.hidden_size=...)")
    t = sub.add_parser("train", help="training-step throughput, MFU and peak memory (random-init models)")
    t.add_argument("--stage", type=int, choices=[1, 2], required=True)
    t.add_argument("--arch", default="vitg", help="conf/arch config: vitg (the paper) or tiny")
    t.add_argument("--llm", default="opt-2.7b", choices=["opt-2.7b", "opt-6.7b", "llama-7b", "tiny"])
    t.add_argument("--batch-size", type=int, default=None, help="default: 100 (stage 1) / 64 (stage 2) as the paper")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--text-len", type=int, default=32)
    t.add_argument("--device", default="auto")
    t.add_argument("--peak-tflops", type=float, default=None)
    t.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    a = p.parse_args(argv)
    if a.what == "data":
        try:
            bench_data(a)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if a.what == "eval":
        bench_eval(a)
        return 0
    if a.what == "train":
        import json

        from blip2_train.bench_train import markdown, run

        model = a.arch
        bs = a.batch_size or (100 if a.stage == 1 else 64)
        r = run(a.stage, model, bs, a.steps, a.warmup, a.image_size, a.llm, a.text_len, a.device, a.peak_tflops)
        text = markdown(r, "blip2-bench " + " ".join(sys.argv[1:] if argv is None else argv))
        print(text)
        print(json.dumps(r, indent=1))
        write_section(f"train-stage{a.stage}-{model}-{r['device'].split(':')[0]}" + (f"-{a.llm}" if a.stage == 2 else ""),
                      text, Path(a.doc))
        return 0
    print(f"blip2-bench {a.what}: not yet available (see the open issue for it)")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
