"""Mid-epoch resume of the training stream at scale: skipped batches are read, not decoded, and a resume whose
loader shape (world size, workers, batch size, sources) changed is refused unless the user opts in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2_train.data.collate import CaptionCollator
from blip2_train.data.datamodule import shape_changes
from blip2_train.data.shards import make_jpeg
from blip2_train.data.decode import SampleDecoder
from blip2_train.data.stream import ShardStream, Source
from blip2_train.data.transforms import TrainTransform
from helpers.tiny import tiny_cli
from helpers.shards import write_tar
from helpers.procs import REPO, clean_env


def _photo(i: int) -> bytes:
    img = Image.linear_gradient("L").resize((40, 30)).convert("RGB")
    return make_jpeg(Image.blend(img, Image.new("RGB", (40, 30), (i * 37 % 256, i * 91 % 256, 120)), 0.5))


def _stream(urls, tokenizer, **kw):
    # the same stream as training's: repeating (batches_per_epoch), flips and random crops on
    return ShardStream([Source("t", [str(u) for u in urls])], SampleDecoder(TrainTransform(16)),
                       CaptionCollator(tokenizer), 4, resampled=False, shuffle_buffer=0, batches_per_epoch=8,
                       max_skip_rate=0.9, min_samples_for_skip_check=1000, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_batches_are_read_not_decoded_and_the_rest_is_identical(tmp_path, tokenizer, workers):
    """Most images of the first 12 samples of each shard are corrupt (truncated JPEGs), one per batch window
    usable: the uninterrupted stream meets them in its first batches; a stream resumed after 3 batches must not
    decode those batches' samples (their corrupt images are not counted, nothing is seen but what the later
    batches hold) and must yield exactly the uninterrupted stream's later batches (same crops, flips, captions)."""
    cap = lambda i: json.dumps({"caption": [f"photo number {i}", f"another caption {i}"], "image_id": i}).encode()
    for n, name in enumerate(("a", "b")):
        write_tar(tmp_path / f"{name}.tar", [(f"s{i:03d}", {"jpg": _photo(i)[:60] if i % 20 < 12 and i % 4 else _photo(i),
                                                      "json": cap(i)}) for i in range(20 * n, 20 * n + 20)])

    def run(skip):
        s = _stream([tmp_path / "a.tar", tmp_path / "b.tar"], tokenizer)
        s.skip_batches = skip
        return list(DataLoader(s, batch_size=None, num_workers=workers))

    full, resumed = run(0), run(3)
    assert sum(b["data_skipped"] for b in full[:3]) == 9  # the uninterrupted stream decoded (and counted) them
    assert len(resumed) == len(full) - 3
    for key in ("data_skipped", "data_seen"):  # the resumed one decodes only what its own batches hold
        assert sum(b[key] for b in resumed) == sum(b[key] for b in full[3:]), key
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["image_id"], b["image_id"])


def test_a_bad_sample_is_replaced_within_its_batch(tmp_path, tokenizer):
    """A repeating stream keeps its batch size: a corrupt sample's place is taken by another augmentation of a
    usable sample of the same window (same image_id, so ITC counts it as a positive), and it is counted."""
    cap = lambda i: json.dumps({"caption": f"photo number {i}", "image_id": i}).encode()
    samples = [(f"s{i:03d}", {"jpg": _photo(i)[:60] if i == 1 else _photo(i), "json": cap(i)}) for i in range(8)]
    write_tar(tmp_path / "a.tar", samples)
    s = _stream([tmp_path / "a.tar"], tokenizer)
    s.batches_per_epoch = 2
    first = next(iter(s))
    assert first["image"].shape[0] == 4 and first["data_skipped"] == 1 and first["data_seen"] == 4
    ids = first["image_id"].tolist()
    assert 1 not in ids and len(set(ids)) == 3 and set(ids) <= {0, 2, 3}


def test_shape_changes_name_what_changed(synth):
    from blip2_train.data.datamodule import Blip2DataModule

    def shape(**kw):
        args = dict(train_sources=[{"name": "coco", "urls": str(synth["train_shards"])}], batch_size=8,
                    num_workers=2, samples_per_epoch=64)
        args.update(kw)
        dm = Blip2DataModule(str(synth["tokenizer"]), **args)
        dm.train_stream = dm.build_train_stream(0, 2)
        return dm.loader_shape()

    base = shape()
    assert shape_changes(base, shape()) == []
    dm = Blip2DataModule(str(synth["tokenizer"]), [{"name": "coco", "urls": str(synth["train_shards"])}],
                         batch_size=8, num_workers=2, samples_per_epoch=64)
    dm.train_stream = dm.build_train_stream(0, 4)
    assert shape_changes(base, dm.loader_shape()) == ["world size (GPUs x nodes) 2 -> 4"]
    assert shape_changes(base, shape(num_workers=3)) == ["data.num_workers 2 -> 3"]
    fewer = shape(train_sources=[{"name": "coco", "urls": sorted(map(str, synth["train_shards"].glob("*.tar")))[:-1]}])
    n = len(list(synth["train_shards"].glob("*.tar")))
    assert shape_changes(base, fewer) == [f"source 'coco' {n} -> {n - 1} shards"]
    assert shape_changes(base, shape(train_sources=[{"name": "vg", "urls": str(synth["train_shards"])}])) == [
        "data.train_sources ['coco'] -> ['vg']"]


@pytest.mark.timeout(300)
def test_resume_with_another_batch_size_is_refused_unless_allowed(synth, tmp_path):
    """Through blip2-train: a run stopped mid-epoch at step 6 (of 20 batches per epoch), resumed with another
    data.batch_size: one `error:` line naming the change, exit 2; with data.allow_reshuffled_resume=true it
    trains on."""
    out = tmp_path / "run"

    def train(*extra):
        cmd = [sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
               *tiny_cli(synth, "data.samples_per_epoch=160", "module.warmup_steps=0", "eval.enabled=false",
                         "callbacks.periodic_eval.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=3",
                         f"paths.output_dir={out}", *extra)]
        return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=250)

    r = train("data.batch_size=8", "trainer.max_steps=6", "module.max_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    last = "ckpt_path=" + str(out / "checkpoints" / "last.ckpt")
    r = train("data.batch_size=4", "trainer.max_steps=10", "module.max_steps=10", last)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.batch_size 8 -> 4" in errors[0], r.stderr[-3000:]
    assert "data.allow_reshuffled_resume=true" in errors[0] and "Traceback" not in r.stderr

    r = train("data.batch_size=4", "trainer.max_steps=8", "module.max_steps=10", last,
              "data.allow_reshuffled_resume=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "may repeat some samples" in r.stderr
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8


def _synth_sources(root, tokenizer, resampled, manifests=True, names=("coco", "vg"), repeat=True, batch_size=8):
    from blip2_train.data.shards import shard_sizes

    sources = []
    for name, weight in (("coco", 1.0), ("vg", 0.5)):
        if name in names:
            urls = sorted(str(u) for u in (root / name).glob("*.tar"))
            sources.append(Source(name, urls, weight, shards=shard_sizes(urls) if manifests else None))
    return ShardStream(sources, SampleDecoder(TrainTransform(16)), CaptionCollator(tokenizer), batch_size,
                       resampled=resampled, shuffle_buffer=10, batches_per_epoch=72 if repeat else None, seed=3)


def _copy_synth_shards(synth, dest):
    import shutil

    for name, sub in (("coco", "coco_karpathy_train"), ("vg", "vg_caption")):
        shutil.copytree(synth["dir"] / "shards" / sub, dest / name)


@pytest.mark.parametrize("resampled,workers", [(False, 0), (True, 2)])
def test_resume_skips_shards_without_reading_them_and_continues_exactly(synth, tokenizer, tmp_path, resampled,
                                                                        workers, caplog):
    """Shards written by blip2-train (manifest.json: samples and bytes per shard, 15 samples each), two sources
    mixed 2:1, a shuffle buffer: a stream resumed after 64 of 72 batches replays the skipped part over sample
    positions, passing over most shards unread, and yields exactly the uninterrupted stream's last 8 batches,
    as the reading skip does."""
    import logging
    import re

    _copy_synth_shards(synth, tmp_path)

    def run(skip, manifests=True):
        s = _synth_sources(tmp_path, tokenizer, resampled, manifests)
        s.skip_batches = skip
        return list(DataLoader(s, batch_size=None, num_workers=workers))

    full = run(0)
    with caplog.at_level(logging.INFO, logger="blip2_train.data"):
        resumed = run(64)
    reading = run(64, manifests=False)
    assert len(full) == 72 and len(resumed) == len(reading) == 8
    for a, b, c in zip(full[64:], resumed, reading):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["image_id"], b["image_id"]) and a["source"] == b["source"]
        assert torch.equal(a["image"], c["image"]) and torch.equal(a["image_id"], c["image_id"])
    if workers == 0:  # worker processes log in their own processes
        passed = int(re.search(r"\((\d+) shards passed over", caplog.text).group(1))
        assert passed >= 20, caplog.text  # ~512 samples of 15-sample shards skipped, a buffer of 10


def test_resume_does_not_read_the_shards_it_passes_over(synth, tokenizer, tmp_path, caplog):
    """The shards a resume passes over are never opened: overwritten with zeros of the same size (the manifest's
    byte count still holds), the resumed stream is still the uninterrupted one (one pass over the shards, so a
    passed-over shard never comes again). A shard whose size no longer matches its manifest makes the resume
    read what it skips instead, and say why."""
    import logging
    import re

    from blip2_train.data.stream import shards_for_slot

    _copy_synth_shards(synth, tmp_path)

    def stream(skip):
        s = _synth_sources(tmp_path, tokenizer, resampled=False, names=("coco",), repeat=False)
        s.skip_batches = skip
        return s

    full = list(stream(0))
    skip = len(full) - 3
    assert skip >= 6, len(full)
    with caplog.at_level(logging.INFO, logger="blip2_train.data"):
        list(stream(skip))
    first = re.search(r"from (\S+)\)", caplog.text).group(1)
    order = shards_for_slot(sorted(str(u) for u in (tmp_path / "coco").glob("*.tar")), 0, 1, 3, 0)
    passed = order[: order.index(first)]
    assert len(passed) >= 2, caplog.text
    for u in passed:
        Path(u).write_bytes(bytes(Path(u).stat().st_size))
    resumed = list(stream(skip))
    assert len(resumed) == 3
    for a, b in zip(full[skip:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_id"], b["image_id"])

    with open(passed[0], "ab") as f:  # another size than the manifest's: its count cannot be trusted
        f.write(bytes(512))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="blip2_train.data"):
        list(stream(skip))
    assert f"resume: {passed[0]} is {Path(passed[0]).stat().st_size} bytes" in caplog.text
    assert "reading the skipped samples instead" in caplog.text


def test_one_pass_resume_over_two_sources_matches_the_uninterrupted_tail(synth, tokenizer, tmp_path):
    """A one-pass stream of two mixed sources ends when the drawn source is empty, possibly after short windows
    of either: resumed at any point (inside, at and past its end), the replay yields exactly the uninterrupted
    stream's remaining batches, and nothing past its end."""
    _copy_synth_shards(synth, tmp_path)
    short = 0
    for weight, batch in ((3.0, 7), (0.3, 7), (1.0, 6)):
        def stream(skip):
            s = _synth_sources(tmp_path, tokenizer, resampled=False, repeat=False, batch_size=batch)
            s.sources[1].weight = weight
            s.skip_batches = skip
            return list(s)

        full = stream(0)
        short += sum(b["image"].shape[0] < batch for b in full)
        for skip in range(1, len(full) + 3):
            resumed = stream(skip)
            assert len(resumed) == max(0, len(full) - skip), (weight, batch, skip)
            for a, b in zip(full[skip:], resumed):
                assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_id"], b["image_id"]), skip
    assert short, "no configuration drew a short window: the test no longer covers them"
