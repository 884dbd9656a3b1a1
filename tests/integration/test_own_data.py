"""Training on your own data as the README says: shards built with `data_scripts/build_shards.py` (and built
again after the annotations are fixed), then `blip2-train` on them, which names every source it trains on and
refuses one whose shards are not there."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from blip2_train.data.shards import make_jpeg
from helpers.procs import REPO, clean_env, cli, one_line, run
from helpers.tiny import tiny_cli


def write_images(root: Path, n: int) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.linear_gradient("L").resize((40, 32)).convert("RGB")
        img = Image.blend(img, Image.new("RGB", (40, 32), (i * 37 % 256, i * 91 % 256, 120)), 0.5)
        (root / "img" / f"{i}.jpg").write_bytes(make_jpeg(img))


def write_csv(path: Path, captions: dict[int, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "image_id"])
        for i, caption in captions.items():
            w.writerow([f"img/{i}.jpg", caption, str(i)])


def build(root: Path, out: Path) -> str:
    """The script as a user runs it: CSV annotations, 3 images per shard. Returns its stdout."""
    r = subprocess.run([sys.executable, "data_scripts/build_shards.py", "--format", "csv",
                        "--annotations", str(root / "ann.csv"), "--images", str(root), "--out", str(out),
                        "--shard-size", "3"], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def captions_in(tar_path: Path) -> dict[str, str]:
    """image_id -> caption, from the samples' .json members."""
    with tarfile.open(tar_path) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return {m["image_id"]: m["caption"] for m in metas}


def on_disk(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("*.tar"))}


def assert_manifest_matches_disk(out: Path) -> dict:
    """The manifest names exactly the tars there, with their sample counts, sizes and the fingerprints their
    .done.json markers hold."""
    m = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == sorted(p.name for p in out.glob("*.tar"))
    assert sorted(p.name for p in out.glob("*.done.json")) == [s["name"] + ".done.json" for s in m["shards"]]
    for s in m["shards"]:
        assert s["num_samples"] == len(captions_in(out / s["name"]))
        assert s["bytes"] == (out / s["name"]).stat().st_size
        assert s["fingerprint"] == json.loads((out / (s["name"] + ".done.json")).read_text())["fingerprint"]
    assert m["num_shards"] == len(m["shards"]) and m["num_samples"] == sum(s["num_samples"] for s in m["shards"])
    return m


def test_rerun_after_a_caption_fix_rebuilds_only_the_shard_that_holds_it(tmp_path):
    write_images(tmp_path, 7)
    captions = {i: f"a picture number {i}" for i in range(7)}
    write_csv(tmp_path / "ann.csv", captions)
    out = tmp_path / "shards"
    assert "3 new, 0 rebuilt, 0 kept" in build(tmp_path, out)
    before, m1 = on_disk(out), assert_manifest_matches_disk(out)
    assert "0 rebuilt, 3 kept" in build(tmp_path, out)  # nothing changed: nothing written again
    assert on_disk(out) == before

    captions[4] = "a fixed caption for picture four"  # image 4 is in the second shard (3 per shard)
    write_csv(tmp_path / "ann.csv", captions)
    said = build(tmp_path, out)
    assert "0 new, 1 rebuilt, 2 kept, 0 removed" in said and "records changed: shard-000001.tar" in said
    assert captions_in(out / "shard-000001.tar")["4"] == "a fixed caption for picture four"
    after = on_disk(out)
    for name in ("shard-000000.tar", "shard-000002.tar"):
        assert after[name] == before[name]  # same mtime and bytes
    m2 = assert_manifest_matches_disk(out)
    changed = [a["name"] for a, b in zip(m1["shards"], m2["shards"]) if a["fingerprint"] != b["fingerprint"]]
    assert changed == ["shard-000001.tar"]


def test_rerun_with_fewer_then_more_records_leaves_exactly_their_shards(tmp_path):
    write_images(tmp_path, 10)
    write_csv(tmp_path / "ann.csv", {i: f"a picture number {i}" for i in range(7)})
    out = tmp_path / "shards"
    build(tmp_path, out)
    first = on_disk(out)["shard-000000.tar"]

    write_csv(tmp_path / "ann.csv", {i: f"a picture number {i}" for i in range(5)})  # shards [0 1 2] [3 4]
    assert "0 new, 1 rebuilt, 1 kept, 1 removed" in build(tmp_path, out)
    m = assert_manifest_matches_disk(out)
    assert (m["num_shards"], m["num_samples"]) == (2, 5) and not (out / "shard-000002.tar").exists()
    assert sorted(captions_in(out / "shard-000001.tar")) == ["3", "4"]

    write_csv(tmp_path / "ann.csv", {i: f"a picture number {i}" for i in range(10)})  # 4 shards: 3 3 3 1
    assert "2 new, 1 rebuilt, 1 kept, 0 removed" in build(tmp_path, out)
    m = assert_manifest_matches_disk(out)
    assert (m["num_shards"], m["num_samples"]) == (4, 10)
    ids = [i for s in m["shards"] for i in captions_in(out / s["name"])]
    assert sorted(ids, key=int) == [str(i) for i in range(10)]
    assert on_disk(out)["shard-000000.tar"] == first


@pytest.mark.parametrize("args,says", [
    (["--images", "{tmp}/no_images"], "--images {tmp}/no_images: no such directory"),
    (["--shard-size", "0"], "--shard-size must be >= 1, not 0"),
    (["--annotations", "{tmp}/missing.csv"], "annotation file not found: {tmp}/missing.csv"),
], ids=["images-folder-missing", "shard-size-0", "annotations-missing"])
def test_build_shards_bad_arguments_are_one_line_and_write_nothing(tmp_path, args, says):
    write_images(tmp_path, 2)
    write_csv(tmp_path / "ann.csv", {0: "a picture", 1: "another picture"})
    argv = {"--annotations": str(tmp_path / "ann.csv"), "--images": str(tmp_path), "--shard-size": "3"}
    argv.update({k: v.format(tmp=tmp_path) for k, v in zip(args[::2], args[1::2])})
    r = subprocess.run([sys.executable, "data_scripts/build_shards.py", "--format", "csv", "--out",
                        str(tmp_path / "shards"), *(x for kv in argv.items() for x in kv)],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {says.format(tmp=tmp_path)}"), lines
    assert not (tmp_path / "shards").exists()


@pytest.fixture(scope="module")
def mine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mine")
    write_images(root, 7)
    write_csv(root / "ann.csv", {i: f"a picture number {i}" for i in range(7)})
    build(root, root / "shards")
    return root / "shards"


def short_run(synth, out: Path, *overrides) -> list[str]:
    return ["experiment=stage1_pretrain",
            *tiny_cli(synth, "trainer.max_steps=1", "data.batch_size=4", "data.samples_per_epoch=8",
                      "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}",
                      *overrides)]


def source_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if "training source" in l]


def test_the_run_names_every_source_it_trains_on(synth, mine, tmp_path):
    # the natural guess replaces the first source's shards only: the log shows the synthetic VG source stays
    r = run("train", short_run(synth, tmp_path / "first", f"data.train_sources.0.urls={mine}"))
    lines = source_lines(r.stderr)
    assert len(lines) == 2, r.stderr[-3000:]
    assert "'coco'" in lines[0] and str(mine) in lines[0] and "3 shards, 7 samples, weight 1" in lines[0]
    assert "'vg'" in lines[1] and str(synth["dir"] / "shards" / "vg_caption") in lines[1]
    # the README's override replaces the list
    replace = f"data.train_sources=[{{name: mine, urls: '{mine}', weight: 1.0}}]"
    r = run("train", short_run(synth, tmp_path / "only", replace))
    lines = source_lines(r.stderr)
    assert len(lines) == 1 and "'mine'" in lines[0] and "7 samples" in lines[0] and "100% of batches" in lines[0], \
        r.stderr[-3000:]


@pytest.mark.parametrize("index,urls,named", [
    (0, "{tmp}/no_such_dir", "{tmp}/no_such_dir"),
    (1, "'{tmp}/*.tar'", "{tmp}/*.tar"),
    (0, "'{train}/shard-{{000000..000099}}.tar'", "{first_missing}"),  # the first few of the 100 exist
], ids=["missing-directory", "glob-matching-nothing", "brace-pattern-past-the-shards"])
def test_a_source_whose_shards_are_missing_is_one_line_naming_it(synth, tmp_path, index, urls, named):
    have = len(list(synth["train_shards"].glob("*.tar")))
    train = synth["train_shards"]
    fill = dict(tmp=tmp_path, train=train, first_missing=train / f"shard-{have:06d}.tar")
    r = cli(*short_run(synth, tmp_path / "run", f"data.train_sources.{index}.urls={urls.format(**fill)}"), timeout=120)
    line = one_line(r)
    name = ["coco", "vg"][index]
    assert f"training source '{name}' (data.train_sources[{index}])" in line and named.format(**fill) in line, line
