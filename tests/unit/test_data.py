"""Data path: shards build and read back, bad input is skipped and counted, ranks x workers split the set."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2_train.data.annotations import read_annotations
from blip2_train.data.captions import clean_caption
from blip2_train.data.collate import CaptionCollator
from blip2_train.data.datamodule import expand_urls
from blip2_train.data.shards import build_shards, make_jpeg
from blip2_train.data.decode import SampleDecoder
from blip2_train.data.stream import ShardStream, Source
from blip2_train.data.transforms import EvalTransform, ImageDecodeError, TrainTransform, decode_image
from blip2_train.utils.errors import DataError
from helpers.shards import write_tar


def read_all_samples(shard_dir):
    out = {}
    for url in expand_urls(str(shard_dir)):
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    jpg = tar.extractfile(m.name[:-5] + ".jpg").read()
                    out[meta["image_id"]] = (meta, jpg)
    return out


def test_shards_read_back_sample_for_sample(synth):
    records = read_annotations(synth["ann"]["train"], "karpathy")
    samples = read_all_samples(synth["train_shards"])
    assert len(samples) == len(records)
    manifest = json.loads((synth["train_shards"] / "manifest.json").read_text())
    assert manifest["num_samples"] == len(records) and manifest["num_rejected"] == 0
    assert manifest["num_shards"] == -(-len(records) // 15)
    for rec in records:
        meta, jpg = samples[rec.image_id]
        caps = meta["caption"] if isinstance(meta["caption"], list) else [meta["caption"]]
        assert caps == rec.captions
        with open(synth["root"] / rec.image, "rb") as f:
            assert f.read() == jpg  # JPEG bytes stored untouched


def _write_images(root, n, size=24):
    rng = random.Random(0)
    recs = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (rng.randrange(256), 0, 0))
        (root / f"im{i}.jpg").write_bytes(make_jpeg(img))
        recs.append({"image": f"im{i}.jpg", "caption": f"a red square number {i}", "image_id": str(i)})
    return recs


def test_builder_rejects_corrupt_and_empty_and_resumes(tmp_path):
    recs = _write_images(tmp_path, 8)
    (tmp_path / "im3.jpg").write_bytes((tmp_path / "im3.jpg").read_bytes()[:40])  # truncated JPEG
    recs[5]["caption"] = "   "  # empty caption
    recs.append({"image": "missing.jpg", "caption": "gone", "image_id": "m"})
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in recs))
    out = tmp_path / "shards"
    m = build_shards(read_annotations(ann, "jsonl"), tmp_path, out, shard_size=3, progress=False)
    assert m["num_samples"] == 6 and m["num_rejected"] == 3
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["image_id"] for r in rejects} == {"3", "5", "m"}
    assert any("missing file" in r["reason"] for r in rejects)
    # resume: delete one shard (as if killed mid-write), keep the others untouched
    first = out / "shard-000000.tar"
    mtime = first.stat().st_mtime_ns
    (out / "shard-000001.tar").unlink()
    m2 = build_shards(read_annotations(ann, "jsonl"), tmp_path, out, shard_size=3, progress=False)
    assert m2["num_samples"] == 6 and first.stat().st_mtime_ns == mtime
    assert (out / "shard-000001.tar").exists()


def _stream(urls, tokenizer, batch_size=4, **kw):
    dec = SampleDecoder(TrainTransform(16, hflip=False), jpeg_draft=False)
    return ShardStream([Source("t", [str(u) for u in urls])], dec, CaptionCollator(tokenizer), batch_size,
                       resampled=False, shuffle_buffer=0, **kw)


def test_stream_skips_and_counts_bad_samples(tmp_path, tokenizer, caplog):
    good = make_jpeg(Image.new("RGB", (20, 20), (0, 200, 0)))
    cap = lambda c: json.dumps({"caption": c, "image_id": "x"}).encode()
    samples = [(f"s{i}", {"jpg": good, "json": cap(f"a green square {i}")}) for i in range(6)]
    samples += [("bad_jpeg", {"jpg": good[:30], "json": cap("broken")}),
                ("empty_cap", {"jpg": good, "json": cap("  ")}),
                ("no_cap", {"jpg": good}),
                ("long_cap", {"jpg": good, "json": cap("word " * 10000)})]
    write_tar(tmp_path / "a.tar", samples)
    stream = _stream([tmp_path / "a.tar"], tokenizer, batch_size=100, max_skip_rate=0.5,
                     min_samples_for_skip_check=1000)
    with caplog.at_level(logging.WARNING):
        batches = list(stream)
    assert sum(b["image"].shape[0] for b in batches) == 7  # 6 good + the long caption, cut to 50 words
    assert sum(b["data_skipped"] for b in batches) == 3 and sum(b["data_seen"] for b in batches) == 10
    assert "bad_jpeg" in caplog.text and "empty_cap" in caplog.text and "no_cap" in caplog.text
    assert max(b["input_ids"].shape[1] for b in batches) <= 32


def test_stream_truncated_tar_is_counted_not_fatal(tmp_path, tokenizer):
    good = make_jpeg(Image.new("RGB", (20, 20), (0, 0, 200)))
    cap = json.dumps({"caption": "a blue square"}).encode()
    write_tar(tmp_path / "ok.tar", [(f"k{i}", {"jpg": good, "json": cap}) for i in range(4)])
    write_tar(tmp_path / "cut.tar", [(f"c{i}", {"jpg": good, "json": cap}) for i in range(4)])
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data.rstrip(b"\0")) - 200])  # inside the last member
    batches = list(_stream([tmp_path / "ok.tar", tmp_path / "cut.tar"], tokenizer, batch_size=100,
                           max_skip_rate=0.9, min_samples_for_skip_check=1000))
    n = sum(b["image"].shape[0] for b in batches)
    assert 4 <= n < 8
    assert sum(b["data_skipped"] for b in batches) >= 1


def test_skip_rate_bound_stops_with_clear_error(tmp_path, tokenizer):
    good = make_jpeg(Image.new("RGB", (20, 20)))
    samples = [(f"b{i}", {"jpg": good[:20], "json": b'{"caption": "x y"}'}) for i in range(10)]
    write_tar(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match=r"max_skip_rate.*bad\.tar"):
        list(_stream([tmp_path / "bad.tar"], tokenizer, max_skip_rate=0.2, min_samples_for_skip_check=5))


def test_two_ranks_two_workers_disjoint_and_covering(synth, tokenizer):
    all_ids = set()
    per_rank = []
    for rank in range(2):
        stream = _stream(expand_urls(str(synth["train_shards"])), tokenizer, batch_size=5, rank=rank, world_size=2)
        ids = []
        for b in DataLoader(stream, batch_size=None, num_workers=2):
            ids.extend(b["image_id"].tolist())
        assert len(ids) == len(set(ids))
        per_rank.append(set(ids))
        all_ids |= set(ids)
    assert not (per_rank[0] & per_rank[1])
    n_images = len(read_annotations(synth["ann"]["train"], "karpathy"))
    assert len(all_ids) == n_images


def test_equal_batch_counts_per_rank_and_mixing_agrees(synth, tokenizer):
    urls = expand_urls(str(synth["train_shards"]))
    dec = SampleDecoder(TrainTransform(16, hflip=False))
    sources = [Source("a", urls[:4], 0.7), Source("b", urls[4:], 0.3)]
    seqs = []
    for rank in range(2):
        s = ShardStream(sources, dec, CaptionCollator(tokenizer), 4, rank=rank, world_size=2, resampled=True,
                        shuffle_buffer=10, batches_per_epoch=7)
        batches = list(DataLoader(s, batch_size=None, num_workers=2))
        seqs.append([b["source"] for b in batches])
    assert len(seqs[0]) == len(seqs[1]) == 8  # ceil(7 / 2 workers) * 2 on both ranks
    assert seqs[0] == seqs[1]  # every rank draws the same source at every step
    assert set(seqs[0]) == {0, 1}


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_decode_odd_modes_to_rgb(mode):
    img = Image.new("RGB", (20, 12), (10, 120, 240))
    if mode == "I;16":
        img = Image.fromarray(np.full((12, 20), 40000, dtype=np.uint16))
    else:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    out = decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (20, 12)
    t = EvalTransform(16)(out)
    assert t.shape == (3, 16, 16) and torch.isfinite(t).all()


def test_decode_guards_tiny_and_bomb():
    with pytest.raises(ImageDecodeError, match="too small"):
        decode_image(make_jpeg(Image.new("RGB", (1, 1))))
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 400 MP, a few KB compressed
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(buf.getvalue())


def test_train_transform_shapes_and_determinism():
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    t = TrainTransform(32)
    a, b = t(img, random.Random(3)), t(img, random.Random(3))
    assert a.shape == (3, 32, 32) and torch.equal(a, b)


def test_caption_cleaning_matches_reference_rules():
    assert clean_caption('A Dog. (Running!) on  the "beach";', max_words=50) == "a dog running on the beach"
    assert clean_caption("x " * 100, max_words=50).count("x") == 50
    assert clean_caption(" ... ") == ""


def test_annotation_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_annotations(tmp_path / "nope.json", "karpathy")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"oops": 1}))
    with pytest.raises(DataError, match="bad.json.*expected a JSON list"):
        read_annotations(bad, "karpathy")
    bad.write_text(json.dumps([{"caption": "no image"}]))
    with pytest.raises(DataError, match="entry 0 has no 'image'"):
        read_annotations(bad, "karpathy")
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": 5}]))
    with pytest.raises(DataError, match="field 'caption'"):
        read_annotations(bad, "karpathy")


def test_visual_genome_region_layout(tmp_path):
    p = tmp_path / "region_descriptions.json"
    p.write_text(json.dumps([{"id": 7, "regions": [{"image_id": 7, "phrase": "a man"}, {"image_id": 7, "phrase": "a hat"}]}]))
    recs = read_annotations(p, "vg")
    assert recs[0].image == "7.jpg" and recs[0].captions == ["a man", "a hat"]


def test_img2dataset_style_shard_is_readable(tmp_path, tokenizer):
    good = make_jpeg(Image.new("RGB", (20, 20), (5, 5, 5)))
    samples = [(f"{i:09d}", {"jpg": good, "txt": f"a photo number {i}".encode(),
                             "json": json.dumps({"url": "http://x", "status": "success"}).encode()})
               for i in range(5)]
    write_tar(tmp_path / "00000.tar", samples)
    batches = list(_stream([tmp_path / "00000.tar"], tokenizer, batch_size=5))
    assert batches[0]["image"].shape[0] == 5 and batches[0]["caption"][0].startswith("a photo number")


def test_a_rebuild_killed_before_its_marker_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    """A re-run killed after a changed shard's new tar is in place but before its marker is written: the next
    run must not take the new tar for the old records (same size, the old marker's fingerprint)."""
    import blip2_train.data.shards as shards

    recs = _write_images(tmp_path, 3)
    ann = tmp_path / "ann.jsonl"
    out = tmp_path / "shards"

    def build(captions):
        ann.write_text("\n".join(json.dumps({**r, "caption": c}) for r, c in zip(recs, captions)))
        return build_shards(read_annotations(ann, "jsonl"), tmp_path, out, shard_size=3, progress=False)

    def captions_in_tar():
        with tarfile.open(out / "shard-000000.tar") as tar:
            return sorted(json.loads(tar.extractfile(m).read())["caption"] for m in tar.getmembers()
                          if m.name.endswith(".json"))

    first = ["a red circle", "a red square", "a red star"]
    build(first)
    real_write = shards.write_json_atomic

    def killed_at_the_marker(path, *a, **k):
        if str(path).endswith(".done.json"):
            raise KeyboardInterrupt  # the kill, between the tar's rename and its marker
        return real_write(path, *a, **k)

    monkeypatch.setattr(shards, "write_json_atomic", killed_at_the_marker)
    with pytest.raises(KeyboardInterrupt):
        build(["a tan circle", "a red square", "a red star"])  # same length: the same tar size
    monkeypatch.setattr(shards, "write_json_atomic", real_write)
    build(first)  # back to the first records: the tar on disk holds the edited caption, and is rebuilt
    assert captions_in_tar() == sorted(first)
