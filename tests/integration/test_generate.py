"""`blip2-generate` and the Python API as a user runs them, on a real stage-2 export and real image files: the
export's recorded decoding (the same captions as `blip2-eval`), flags and keyword arguments over it, bad images
skipped and counted with an exit status that says so, every format PIL decodes read from folders, EXIF
orientation applied, and the API's one-image / empty-list forms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.procs import REPO, clean_env, one_line

# what the export records: the run's eval.generate over the captioning defaults, as blip2-export writes it
RECORDED = {"num_beams": 2, "max_new_tokens": 3, "min_new_tokens": 1, "repetition_penalty": 1.0,
            "length_penalty": 1.0}


def generate(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip2_train.cli.generate", *map(str, args)], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=timeout)


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


UPRIGHT, TURNED = "standing", "lying"  # the captions taught for the stripes upright and turned


def stripes() -> Image.Image:
    """Red and blue vertical stripes, 4 px each at the model's 32 px: each 8 px ViT patch holds a red and a blue
    stripe side by side, and turned, one above the other. (A random model pools over patches: it tells turns apart
    by what a patch holds, hardly by where it is.)"""
    a = np.zeros((64, 64, 3), np.uint8)
    for x in range(0, 64, 16):
        a[:, x:x + 8, 0] = 230
        a[:, x + 8:x + 16, 2] = 230
    return Image.fromarray(a)


def teach_orientation(model, tokenizer, steps: int = 100) -> None:
    """A few steps of the stage-2 loss (the tiny random LLM unfrozen for them) that teach the model one caption
    for the stripes upright and another for them turned as a phone stores them: then a caption says which way up
    the model saw the picture."""
    import torch

    from blip2_train.data.collate import Stage2Collator
    from blip2_train.data.transforms import EvalTransform

    t = EvalTransform(32)
    shown = [(stripes(), UPRIGHT), (stripes().transpose(Image.Transpose.ROTATE_90), TURNED)]
    collate = Stage2Collator(tokenizer, model.num_query_tokens, model.image_token_id, model.end_token_id,
                             prompt="a photo of", max_txt_len=64)
    batch = collate([{"image": t(img), "caption": c, "image_id": i} for i, (img, c) in enumerate(shown)])
    for p in model.parameters():  # the tiny random LLM too: frozen, it cannot be steered to any caption
        p.requires_grad_(True)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.set_train_modes(True)
    for _ in range(steps):
        loss = model(batch["image"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.set_train_modes(False)


@pytest.fixture(scope="module")
def export(synth, tiny_llms, tmp_path_factory) -> Path:
    """A stage-2 export of the tiny arch, taught to tell the stripes upright from turned, whose
    blip2_train.json records a decoding other than the captioning defaults."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from blip2_train.config.compose import compose
    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    cfg = compose("eval", ["experiment=caption_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
                           f"paths.llm_dir={tiny_llms['opt']}", "paths.stage2_checkpoint=null"])
    with open_dict(cfg):
        cfg.model.stage2_checkpoint = None
    model, tokenizer = instantiate(cfg.model), load_llm_tokenizer(tiny_llms["opt"])
    teach_orientation(model, tokenizer)
    out = tmp_path_factory.mktemp("generate_export")
    export_stage2(model, tokenizer, out, image_size=32, prompt="a photo of", generate_kwargs=RECORDED)
    assert json.loads((out / "blip2_train.json").read_text())["generate_kwargs"] == RECORDED
    return out


@pytest.fixture(scope="module")
def model(export):
    import blip2_train

    return blip2_train.load(export, device="cpu")


def test_captions_use_the_decoding_the_export_records(export, model, synth, tmp_path):
    """blip2-eval with the recorded decoding, blip2-generate and the API without any: the same captions (not the
    beam-5, 8-30 token defaults); --max-new-tokens and a keyword argument override the record alike."""
    entries = json.loads((Path(synth["dir"]) / "coco/annotations/coco_karpathy_test.json").read_text())[:4]
    images = [str(synth["root"] / e["image"]) for e in entries]
    dec = [f"eval.generate.{k}={RECORDED[k]}" for k in ("num_beams", "max_new_tokens", "min_new_tokens")]
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.evaluate", "experiment=caption_coco_eval",
                        "preset=tiny", f"paths.data_dir={synth['dir']}", "data.num_workers=0",
                        f"paths.stage2_checkpoint={export}", "data.eval_set.limit=4", "data.eval_batch_size=4",
                        f"paths.output_dir={tmp_path / 'eval'}", *dec],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = [p["caption"] for p in json.loads((tmp_path / "eval" / "captions_predictions.json").read_text())]
    by_hand = model.generate(images, ["a photo of"] * 4, **RECORDED)
    assert evaluated == by_hand
    assert model.generate(images, ["a photo of"] * 4, num_beams=5, max_new_tokens=30, min_new_tokens=8) != by_hand

    g = generate(export, *images, "--out", tmp_path / "caps.jsonl", "--batch-size", 3)
    assert g.returncode == 0, g.stderr[-3000:]
    assert [x["text"] for x in lines(tmp_path / "caps.jsonl")] == evaluated
    assert model.caption(images) == evaluated

    g = generate(export, *images, "--out", tmp_path / "longer.jsonl", "--max-new-tokens", 6)
    assert g.returncode == 0, g.stderr[-3000:]
    longer = model.generate(images, ["a photo of"] * 4, **{**RECORDED, "max_new_tokens": 6})
    assert longer != evaluated
    assert [x["text"] for x in lines(tmp_path / "longer.jsonl")] == longer == model.caption(images, max_new_tokens=6)


def write_image(path: Path, fmt: str, seed: int, size=(40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
    img.save(path, format=fmt)
    return path


def test_a_folder_with_bad_images_captions_the_good_ones_and_names_the_rest(export, model, tmp_path):
    """Good photos (.jpg, and .gif / .tiff, which folders used to leave out), an empty .jpg, a text file named
    .jpg, and a notes file: every good one captioned, each bad one named on one line and counted, the notes file
    named as left out, a summary line saying where the output went, exit status 3."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    good = [write_image(photos / "a.jpg", "JPEG", 1), write_image(photos / "sub" / "b.gif", "GIF", 2),
            write_image(photos / "c.tiff", "TIFF", 3), write_image(photos / "d.PNG", "PNG", 4)]
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "sub" / "notes.jpg").write_text("not a picture\n")
    (photos / "README.txt").write_text("holiday 2023\n")
    out = tmp_path / "caps.jsonl"
    r = generate(export, photos, "--out", out, "--batch-size", 2)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    got = {x["image"]: x["text"] for x in lines(out)}
    assert sorted(got) == sorted(map(str, good))
    assert [got[str(p)] for p in good] == model.caption(good)
    err = r.stderr.splitlines()
    skipped = [line for line in err if line.startswith("skipped ")]
    assert skipped == [f"skipped {photos / 'empty.jpg'}: empty file (0 bytes)",
                       f"skipped {photos / 'sub' / 'notes.jpg'}: cannot decode image: not an image format PIL knows "
                       "(14 bytes)"], r.stderr[-3000:]
    assert [line for line in err if "left out" in line and "by their extension" in line] == [
        f"{photos}: left out 1 file(s) that are not images by their extension: README.txt"]
    assert err[-1] == (f"blip2-generate: 4 captioned, 2 skipped: {photos / 'empty.jpg'}, "
                       f"{photos / 'sub' / 'notes.jpg'}; 1 input(s) with files left out (listed above); output: {out}")

    # nothing readable: an error (2), one line; the summary still says what happened
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    r = generate(export, bad, "--out", tmp_path / "none.jsonl")
    assert "none of the 1 image(s) could be read" in one_line(r)
    assert "blip2-generate: 0 captioned, 1 skipped" in r.stderr
    # all good: 0, and the summary on stderr with the JSON lines on stdout
    r = generate(export, good[0], good[2])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(x)["image"] for x in r.stdout.splitlines()] == [str(good[0]), str(good[2])]
    assert r.stderr.splitlines()[-1] == "blip2-generate: 2 captioned, 0 skipped; output: stdout"
    h = generate("--help")
    assert h.returncode == 0 and "3 some images skipped" in h.stdout


def test_a_shard_with_a_bad_image_captions_the_rest_and_counts_what_it_left_out(export, model, tmp_path):
    import tarfile

    good = write_image(tmp_path / "0001.png", "PNG", 6)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(good, "0001.png")
        for name, data in (("0001.json", b'{"caption": "x"}'), ("0002.jpg", b"\xff\xd8\xff"),
                           ("0002.json", b'{"caption": "y"}')):
            (tmp_path / name).write_bytes(data)
            tar.add(tmp_path / name, name)
    r = generate(export, shard, "--out", tmp_path / "caps.jsonl")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [(x["image"], x["text"]) for x in lines(tmp_path / "caps.jsonl")] == [(f"{shard}::0001.png",
                                                                                 model.caption(good))]
    err = r.stderr.splitlines()
    assert f"{shard}: left out 2 member(s) that are not images: 2 .json" in err
    assert any(line.startswith(f"skipped {shard}::0002.jpg: cannot decode image") for line in err)
    assert err[-1].startswith(f"blip2-generate: 1 captioned, 1 skipped: {shard}::0002.jpg;")


def test_questions_about_missing_or_bad_images_are_skipped_and_counted(export, model, tmp_path):
    write_image(tmp_path / "a.png", "PNG", 5)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"image": str(tmp_path / n), "question": "what is it?"}) + "\n"
                         for n in ("a.png", "gone.jpg", "broken.jpg")))
    r = generate(export, "--questions", q, "--out", tmp_path / "a.jsonl")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [x["text"] for x in lines(tmp_path / "a.jsonl")] == model.answer([str(tmp_path / "a.png")],
                                                                             ["what is it?"])
    assert f"skipped {tmp_path / 'gone.jpg'}: file not found" in r.stderr.splitlines()
    assert any(line.startswith(f"skipped {tmp_path / 'broken.jpg'}: cannot decode image")
               for line in r.stderr.splitlines())
    assert "blip2-generate: 1 answered, 2 skipped" in r.stderr.splitlines()[-1]


def sideways_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The stripes as an upright JPEG, as a phone stores them (turned, EXIF orientation 6 "rotate 90 clockwise
    to view"), and the turned pixels without the tag."""
    upright = stripes()
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = stored.getexif()
    exif[0x0112] = 6
    paths = tmp_path / "upright.jpg", tmp_path / "phone.jpg", tmp_path / "untagged.jpg"
    upright.save(paths[0], quality=100, subsampling=0)
    stored.save(paths[1], quality=100, subsampling=0, exif=exif)
    stored.save(paths[2], quality=100, subsampling=0)
    return paths


def test_exif_orientation_reaches_the_model_upright(export, model, tmp_path):
    """A photo stored turned with its orientation tag is captioned as the upright file, by the API (path, PIL
    image) and blip2-generate; the same turned pixels without the tag get the other caption."""
    upright, phone, untagged = sideways_pair(tmp_path)
    assert model.caption(upright, max_new_tokens=20) == UPRIGHT
    assert model.caption(untagged, max_new_tokens=20) == TURNED
    assert (model.pixel(phone) - model.pixel(upright)).abs().max() < 0.05
    assert model.caption([phone, Image.open(phone)], max_new_tokens=20) == [UPRIGHT, UPRIGHT]
    r = generate(export, upright, phone, untagged, "--out", tmp_path / "caps.jsonl", "--max-new-tokens", 20)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["text"] for x in lines(tmp_path / "caps.jsonl")] == [UPRIGHT, UPRIGHT, TURNED]


def test_api_takes_one_image_or_a_list_and_skips_on_request(model, stage1_export, tmp_path):
    import blip2_train
    from blip2_train.utils.errors import DataError

    a = write_image(tmp_path / "a.jpg", "JPEG", 7)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert model.caption([]) == [] and model.answer([], []) == [] and model.generate([], []) == []
    one = model.caption(str(a))
    assert isinstance(one, str) and [one] == model.caption([str(a)])
    assert model.caption(a) == model.caption(a.read_bytes()) == model.caption(Image.open(a)) == one
    assert model.answer(str(a), "what is it?") == model.answer([str(a)], ["what is it?"])[0]
    assert model.generate(str(a), "a photo of", **model.caption_decoding) == one
    with pytest.raises(TypeError, match="a list of images takes a list of questions"):
        model.answer([str(a)], "what is it?")
    with pytest.raises(TypeError, match="one image takes one prompt"):
        model.generate(str(a), ["a", "b"])
    with pytest.raises(TypeError, match="images: give a path"):
        model.caption(42)
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        model.caption([str(a), str(empty)])
    assert model.caption([str(a), str(empty)], on_error="skip") == [one, None]
    assert model.caption(str(empty), on_error="skip") is None
    assert model.caption([str(empty)], on_error="skip") == [None]
    with pytest.raises(DataError, match=r"images\[1\] \(encoded bytes\): empty file"):
        model.caption([a.read_bytes(), b""])
    with pytest.raises(ValueError, match="on_error must be"):
        model.caption([str(a)], on_error="ignore")

    s = blip2_train.load(stage1_export, device="cpu")
    assert s.score([], []) == []
    pair = s.score(str(a), "a red bus")
    assert isinstance(pair, float) and s.score([str(a)], ["a red bus"]) == pytest.approx([pair])
    assert s.score([str(a), str(empty)], ["a red bus", "a cat"], on_error="skip")[1] is None
    with pytest.raises(TypeError, match="a list of images takes a list of texts"):
        s.score([str(a)], "a red bus")
