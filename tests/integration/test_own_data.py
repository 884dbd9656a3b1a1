"""Training on your own data as the README says: shards built with `data_scripts/build_shards.py` (and built
again after the annotations are fixed), then `blip2-train` on them, which names every source it trains on and
refuses one whose shards are not there."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from blip2_train.data.decode import SkipCounter
from blip2_train.data.instruct import InstructionDecoder
from blip2_train.data.shards import make_jpeg
from blip2_train.data.transforms import TrainTransform
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


def captions_in(tar_path: Path) -> dict[str, str | list]:
    """image_id -> caption (or question/answer pairs), from the samples' .json members."""
    with tarfile.open(tar_path) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    return {m["image_id"]: m["caption"] if "caption" in m else m["qa"] for m in metas}


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


def build_as_user(fmt: str, root: Path, annotations, *options) -> subprocess.CompletedProcess:
    """build_shards.py run as a user runs it on an instruction format, 2 images per shard, into root/shards."""
    return subprocess.run([sys.executable, "data_scripts/build_shards.py", "--format", fmt, "--annotations",
                           str(annotations), "--images", str(root), "--out", str(root / "shards"), "--shard-size", "2",
                           *options], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)


def instruction_samples(out: Path) -> list[dict]:
    """Every sample decoded back as instruction tuning reads it: the raw tar members through InstructionDecoder."""
    raw = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                raw.setdefault(key, {"__key__": key, "__url__": str(tar_path)})[ext] = tar.extractfile(m).read()
    decoder, counter = InstructionDecoder(TrainTransform(16)), SkipCounter()
    samples = [decoder(s, random.Random(0), counter) for s in raw.values()]
    assert counter.skipped == 0, counter.reasons
    return samples


def write_instruct(root: Path, answer_of_4: str = "Four.") -> Path:
    rows = [{"image": f"img/{i}.jpg", "instruction": f"What is picture {i}?", "answer": f"Picture {i}."}
            for i in range(5)]
    rows += [{"image": "img/4.jpg", "instruction": "How many?", "answer": answer_of_4, "task": "count"}]
    (root / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "ann.jsonl"


def test_instruct_shards_built_as_a_user_builds_them_and_rebuilt_when_an_answer_is_fixed(tmp_path):
    write_images(tmp_path, 5)
    r = build_as_user("instruct", tmp_path, write_instruct(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "5 samples (6 pairs) in 3 shards (3 new, 0 rebuilt, 0 kept, 0 removed), 0 rejected" in r.stdout
    out = tmp_path / "shards"
    assert_manifest_matches_disk(out)
    assert captions_in(out / "shard-000002.tar")["4"][1] == {"instruction": "How many?", "answer": "Four.",
                                                             "task": "count"}
    assert {(s["instruction"], s["answer"]) for s in instruction_samples(out)} >= {
        (f"What is picture {i}?", f"Picture {i}.") for i in range(4)}
    assert "0 new, 0 rebuilt, 3 kept" in build_as_user("instruct", tmp_path, write_instruct(tmp_path)).stdout
    said = build_as_user("instruct", tmp_path, write_instruct(tmp_path, "Just one.")).stdout
    assert "0 new, 1 rebuilt, 2 kept, 0 removed" in said and "records changed: shard-000002.tar" in said
    assert captions_in(out / "shard-000002.tar")["4"][1]["answer"] == "Just one."


@pytest.mark.parametrize("turns,pairs", [("first", 3), ("all", 4)])
def test_llava_shards_built_as_a_user_builds_them(tmp_path, turns, pairs):
    write_images(tmp_path, 3)
    chat = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A gradient."},
            {"from": "human", "value": "Which colours?"}, {"from": "gpt", "value": "Grey and blue."}]
    entries = [{"id": str(i), "image": f"img/{i}.jpg", "conversations": chat[: 4 if i == 1 else 2]} for i in range(3)]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    r = build_as_user("llava", tmp_path, tmp_path / "llava.json", "--llava-turns", turns)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"3 samples ({pairs} pairs) in 2 shards (2 new, 0 rebuilt, 0 kept, 0 removed), 0 rejected" in r.stdout
    assert_manifest_matches_disk(tmp_path / "shards")
    samples = instruction_samples(tmp_path / "shards")
    assert {s["task"] for s in samples} == {"instruction"} and "A gradient." in {s["answer"] for s in samples}
    if turns == "all":
        assert captions_in(tmp_path / "shards" / "shard-000000.tar")["1"][1]["instruction"] == \
            "Question: What is this? Answer: A gradient. Question: Which colours? Answer:"


def test_vqa_and_gqa_shards_built_as_a_user_builds_them(tmp_path):
    write_images(tmp_path, 2)
    qs = [{"question_id": q, "image_id": q // 10, "question": f"Question {q}?"} for q in (0, 1, 10)]
    anns = [{"question_id": q, "answers": [{"answer": "yes"}] * 9 + [{"answer": "no"}]} for q in (0, 1, 10)]
    (tmp_path / "q.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    r = build_as_user("vqa", tmp_path, f"{tmp_path / 'q.json'},{tmp_path / 'a.json'}", "--image-template",
                      "img/{image_id}.jpg")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 samples (3 pairs) in 1 shards (1 new, 0 rebuilt, 0 kept, 0 removed), 0 rejected" in r.stdout
    assert {s["task"] for s in instruction_samples(tmp_path / "shards")} == {"vqa"}
    (tmp_path / "gqa.json").write_text(json.dumps({"7": {"imageId": "img/1", "question": "Why?", "answer": "no"}}))
    r = build_as_user("gqa", tmp_path, tmp_path / "gqa.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 samples (1 pairs) in 1 shards (0 new, 1 rebuilt, 0 kept, 0 removed)" in r.stdout


@pytest.mark.parametrize("fmt,name,content,says", [
    ("instruct", "ann.jsonl", '{"image": "img/0.jpg", "instruction": "Hi?", "answer": "Yes."}\n'
                              '{"image": "img/1.jpg", "instruction": "Hi?"}\n', "ann.jsonl:2: missing field 'answer'"),
    ("llava", "llava.json", json.dumps([{"image": "img/0.jpg", "conversations": [
        {"from": "human", "value": "<image>\nHi?"}, {"from": "human", "value": "Hello?"}]}]),
     "llava.json: entry 0: conversations[1]: field 'from' is 'human', expected 'gpt' (turns alternate human, gpt)"),
], ids=["instruct-line-without-answer", "llava-turns-not-alternating"])
def test_a_bad_instruction_annotation_is_one_line_naming_file_entry_and_field(tmp_path, fmt, name, content, says):
    write_images(tmp_path, 2)
    (tmp_path / name).write_text(content)
    r = build_as_user(fmt, tmp_path, tmp_path / name)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path}/{says}"]
    assert not (tmp_path / "shards").exists()
