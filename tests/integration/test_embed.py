"""`blip2-embed` as a user runs it, on the stage-1 export and the synthetic world's images: one and two processes
(torchrun, gloo) write the same parts; a run killed mid-way and run again ends with the files of an uninterrupted
run; the documented search over its output ranks as `Blip2Scorer.score(head="itc")`; an unreadable photo is
skipped, named and counted; bad arguments are one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.procs import REPO, clean_env, one_line, run

ARGS = ["--kinds", "all", "--shard-size", "16", "--batch-size", "5"]

# the command with a kill at the moment a part's arrays are on disk and its record is not: SIGKILL, the one
# signal nothing can catch, sent by the process to itself before the `KILL_AT`-th part record is written
KILLED = """
import os, signal, sys
import blip2_train.eval.embedding as embedding
real, records = embedding.write_json_atomic, []
def killed_before_a_record(path, *a, **k):
    if path.name.startswith("part-"):
        if len(records) == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        records.append(path)
    return real(path, *a, **k)
embedding.write_json_atomic = killed_before_a_record
from blip2_train.cli.embed import main
sys.exit(main(sys.argv[1:]))
"""


def embed(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip2_train.cli.embed", *map(str, args)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def captions(synth, tmp_path_factory) -> Path:
    """id<TAB>caption for every image of the world (its first COCO caption), ids as the folder names them."""
    first = {}
    for split in ("train", "val", "test"):  # (train has an entry per caption)
        for e in json.loads((Path(synth["dir"]) / f"coco/annotations/coco_karpathy_{split}.json").read_text()):
            first.setdefault(e["image"], e["caption"][0] if isinstance(e["caption"], list) else e["caption"])
    images = sorted(p.relative_to(synth["root"]).as_posix() for p in Path(synth["root"]).rglob("*.jpg"))
    lines = [f"{image}\t{first.get(image, 'a shape on a plain background')}" for image in images]
    path = tmp_path_factory.mktemp("embed_captions") / "captions.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def one_proc(synth, stage1_export, captions, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Every kind of every image of the world with its caption, on one process, uninterrupted."""
    out = tmp_path_factory.mktemp("embed_one") / "emb"
    r = run("embed", ["--model", str(stage1_export), "--images", str(synth["root"]), "--captions", str(captions),
                      "--out", str(out), *ARGS])
    return out, r


def test_one_and_two_processes_write_the_same_parts(one_proc, synth, stage1_export, captions, tmp_path):
    """The same part files on 1 and 2 processes (each rank its share), the same embeddings per id, every image
    once; a progress bar and a summary saying where the output went."""
    from blip2_train.eval.embedding import KINDS, load_embeddings

    out1, r1 = one_proc
    n_images = len(list(Path(synth["root"]).rglob("*.jpg")))
    assert "embed: 100%" in r1.stderr
    assert r1.stderr.splitlines()[-1].startswith(
        f"blip2-embed: {n_images} images embedded ({', '.join(KINDS)}) in {-(-n_images // 16)} part(s) "
        f"({-(-n_images // 16)} written now, 0 kept from an earlier run), 0 skipped; output: {out1}")
    out2 = tmp_path / "emb"
    run("embed", ["--model", str(stage1_export), "--images", str(synth["root"]), "--captions", str(captions),
                  "--out", str(out2), *ARGS], nproc=2)
    assert sorted(files(out1)) == sorted(files(out2))
    a, b = load_embeddings(out1), load_embeddings(out2)
    assert a["ids"] == b["ids"] and len(set(a["ids"])) == n_images
    for k in KINDS:
        assert a[k].shape[0] == n_images
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)
    assert (a["text_mask"] == b["text_mask"]).all()
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["counts"] == {"embedded": n_images, "skipped": 0, "parts": -(-n_images // 16)}
    assert manifest["arrays"]["image_embeds_proj"] == [4, 16] and manifest["arrays"]["text_embeds"] == [35, 32]


def test_the_documented_search_over_the_files_ranks_as_score_itc(one_proc, synth, stage1_export, tmp_path):
    """The docs' snippet: load the files, embed a query, rank with `search`: the scores and order of
    `score(head="itc")` for the query against every image."""
    import blip2_train
    from blip2_train.eval.embedding import load_embeddings, search

    out, _ = one_proc
    index = load_embeddings(out, kinds=["image_embeds_proj"])
    model = blip2_train.load(stage1_export, device="cpu")
    query = model.embed(texts=["a red circle in the top left"], kinds=["text_embeds_proj"])
    scores, top = search(index["image_embeds_proj"], query["text_embeds_proj"], k=10)
    paths = [str(Path(synth["root"]) / i) for i in index["ids"]]
    itc = np.asarray(model.score(paths, ["a red circle in the top left"] * len(paths), head="itc"))
    assert top[0].tolist() == np.argsort(-itc, kind="stable")[:10].tolist()
    np.testing.assert_allclose(scores[0], itc[top[0]], atol=1e-5, rtol=0)

    # the queries embedded by the command (captions alone: ids are the line numbers) rank the same
    queries = tmp_path / "queries.txt"
    queries.write_text("a blue square\na red circle in the top left\n")
    r = embed("--model", stage1_export, "--captions", queries, "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr[-3000:]
    q = load_embeddings(tmp_path / "q")
    assert q["ids"] == ["1", "2"] and q["text_embeds_proj"].shape == (2, 35, 16) and "text_mask" in q
    assert search(index["image_embeds_proj"], q["text_embeds_proj"], k=10)[1][1].tolist() == top[0].tolist()


def test_a_killed_run_run_again_ends_with_the_files_of_an_uninterrupted_one(one_proc, synth, stage1_export,
                                                                           captions, tmp_path):
    """SIGKILL after two parts, with the third's arrays written and not its record; the same command again
    keeps the two, redoes the third and the rest: every file byte for byte that of the uninterrupted run. A
    third run keeps everything; other arguments on the folder are refused in one line."""
    out = tmp_path / "emb"
    args = ["--model", stage1_export, "--images", synth["root"], "--captions", captions, "--out", out, *ARGS]
    r = subprocess.run([sys.executable, "-c", KILLED, *map(str, args)], cwd=REPO, env=clean_env(KILL_AT="2"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("part-*.json")) == ["part-000000.json", "part-000001.json"]
    assert (out / "part-000002.image_embeds.npy").exists() and not (out / "manifest.json").exists()

    again = embed(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    parts = len(list((one_proc[0]).glob("part-*.json")))
    assert f"({parts - 2} written now, 2 kept from an earlier run)" in again.stderr.splitlines()[-1]
    assert files(out) == files(one_proc[0])

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    third = embed(*args, "--batch-size", "7")  # how the work is batched is free; what is written is not
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"(0 written now, {parts} kept from an earlier run)" in third.stderr.splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")} == before

    refused = one_line(embed(*args, "--shard-size", "8"))
    assert refused == ("error: --out " + str(out) + " holds embeddings made with other arguments (shard_size: "
                       "16 -> 8): give another --out, or delete it to start over")


def test_an_unreadable_photo_is_skipped_named_and_counted(synth, stage1_export, tmp_path):
    """A folder with good photos, an empty .jpg and a text file named .png: the good ones embedded, each bad one
    named on stderr, in the summary, in its part's record and the manifest; exit status 3; safetensors parts.
    A list file naming a photo that is not there: the same."""
    from blip2_train.eval.embedding import load_embeddings

    photos = tmp_path / "photos"
    photos.mkdir()
    good = sorted(Path(synth["root"]).rglob("*.jpg"))[:5]
    for i, p in enumerate(good):
        (photos / f"{i}.jpg").write_bytes(p.read_bytes())
    (photos / "2b.jpg").write_bytes(b"")
    (photos / "notes.png").write_text("not a picture\n")
    out = tmp_path / "emb"
    r = embed("--model", stage1_export, "--images", photos, "--out", out, "--format", "safetensors",
              "--shard-size", "3")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"skipped {photos / '2b.jpg'}: empty file (0 bytes)" in r.stderr.splitlines()
    assert r.stderr.splitlines()[-1].startswith(
        "blip2-embed: 5 images embedded (image_embeds_proj) in 3 part(s) (3 written now, 0 kept from an earlier "
        "run), 2 skipped: 2b.jpg, notes.png; output: ")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["id"] for s in manifest["skipped"]] == ["2b.jpg", "notes.png"]
    assert "cannot decode image" in manifest["skipped"][1]["reason"]
    # parts of 3 in sorted order: 0 1 2 | 2b 3 4 | notes
    assert [json.loads((out / f"part-00000{i}.json").read_text())["ids"] for i in range(3)] == [
        ["0.jpg", "1.jpg", "2.jpg"], ["3.jpg", "4.jpg"], []]
    emb = load_embeddings(out)
    assert emb["ids"] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg", "4.jpg"] and emb["image_embeds_proj"].shape == (5, 4, 16)
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-{i:06d}.{e}" for i in range(3)
                                                          for e in ("json", "safetensors")]

    # a list file: relative lines from its folder, absolute ones as they are; a missing photo skipped and named
    listed = photos / "list.txt"
    listed.write_text(f"0.jpg\n\ngone.jpg\n{photos / '4.jpg'}\n")
    r = embed("--model", stage1_export, "--images", listed, "--out", tmp_path / "listed")
    assert r.returncode == 3 and f"skipped {photos / 'gone.jpg'}: file not found" in r.stderr.splitlines()
    got = load_embeddings(tmp_path / "listed")
    assert got["ids"] == ["0.jpg", str(photos / "4.jpg")]
    np.testing.assert_allclose(got["image_embeds_proj"], emb["image_embeds_proj"][[0, 4]], atol=1e-6, rtol=0)


def test_shards_are_read_by_key_one_part_each(synth, stage1_export, tmp_path):
    """--shards (a folder of tars): one part per shard, ids the sample keys, each sample's image and first caption
    embedded as the API embeds them; a sample whose image cannot be decoded is skipped and named."""
    import shutil
    import tarfile

    import blip2_train
    from blip2_train.data.captions import as_caption_list
    from blip2_train.eval.embedding import load_embeddings

    shards = tmp_path / "shards"
    shards.mkdir()
    for t in sorted(Path(synth["test_shards"]).glob("*.tar")):
        shutil.copy(t, shards / t.name)
    with tarfile.open(shards / "zz-bad.tar", "w") as tar:
        for name, data in (("x_bad.jpg", b"\xff\xd8\xff"), ("x_bad.json", b'{"caption": "a red circle"}')):
            (tmp_path / name).write_bytes(data)
            tar.add(tmp_path / name, name)
    out = tmp_path / "emb"
    r = embed("--model", stage1_export, "--shards", shards, "--out", out, "--kinds",
              "image_embeds_proj,text_embeds_proj")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert any(l.startswith(f"skipped {shards / 'zz-bad.tar'}::x_bad: cannot decode image") for l in
               r.stderr.splitlines()), r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["shard"] for p in manifest["parts"]] == [str(p) for p in sorted(shards.glob("*.tar"))]
    assert manifest["parts"][-1]["rows"] == 0 and [s["id"] for s in manifest["skipped"]] == ["x_bad"]

    emb = load_embeddings(out)
    meta = {}
    for t in sorted(shards.glob("*.tar"))[:-1]:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta[m.name[:-5]] = json.loads(tar.extractfile(m).read())
    assert emb["ids"] == list(meta) and len(emb["ids"]) == 24  # shard by shard, in member order
    model = blip2_train.load(stage1_export, device="cpu")
    want = model.embed(images=[str(Path(synth["root"]) / meta[k]["image"]) for k in emb["ids"]],
                       texts=[as_caption_list(meta[k]["caption"])[0] for k in emb["ids"]],
                       kinds=["image_embeds_proj", "text_embeds_proj"])
    np.testing.assert_allclose(emb["image_embeds_proj"], want["image_embeds_proj"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(emb["text_embeds_proj"][:, 0], want["text_embeds_proj"][:, 0], atol=1e-5, rtol=0)


def test_bad_inputs_are_one_line(synth, stage1_export, captions, tmp_path):
    """An empty folder, a stage-2 export, an unknown kind, a kind the inputs cannot give, captions that do not
    match the images: exit 2, one line naming it, nothing written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    stage2 = tmp_path / "stage2"
    stage2.mkdir()
    (stage2 / "config.json").write_text(json.dumps({"architectures": ["Blip2ForConditionalGeneration"]}))
    (stage2 / "blip2_train.json").write_text(json.dumps({"stage": 2}))
    few = tmp_path / "few.txt"
    few.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    images = ["--images", str(synth["root"])]
    cases = [(["--model", stage1_export, "--images", empty], f"--images {empty}: no image files in this folder"),
             (["--model", stage2, *images], f"--model {stage2} is a stage-2 export: blip2-embed needs a stage-1"),
             (["--model", stage1_export, *images, "--kinds", "image_feats"], "unknown kind 'image_feats': the kinds "
              "are image_embeds, image_embeds_proj, text_embeds, text_embeds_proj, multimodal_embeds"),
             (["--model", stage1_export, *images, "--kinds", "multimodal_embeds"],
              "kind 'multimodal_embeds' needs images and texts"),
             (["--model", stage1_export, *images, "--captions", few], f"{few}: 2 captions for "),
             (["--model", stage1_export, "--images", tmp_path / "nowhere"], "no such folder or file")]
    for args, message in cases:
        line = one_line(embed(*args, "--out", out))
        assert message in line, (args, line)
    assert not out.exists()
