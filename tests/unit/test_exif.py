"""EXIF orientation is applied wherever an image is decoded: a photo stored sideways with its orientation tag comes
out as the same photo stored upright without one, from `decode_image`, the training transform (the fast path that
draws its crop box from the JPEG header, and the exact one), the evaluation transform / `load_eval_image`, and
training from shards (which keep the JPEG bytes, tag included)."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_train.data.transforms import EvalTransform, TrainTransform, decode_image
from blip2_train.models.vision import CLIP_MEAN, CLIP_STD

ORIENTATION = 0x0112
# orientation tag -> how a camera stores the upright picture under that tag (the tag says how to undo it)
STORED = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,   # "rotate 90 clockwise to view": stored turned 90 counter-clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def encode(img: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    """A real file's bytes, with a real EXIF orientation tag when given. JPEG at quality 100 without chroma
    subsampling: its quantisation is then symmetric, so a turned picture compresses as the upright one does."""
    kw = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = img.getexif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def sideways(img: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    return encode(img.transpose(STORED[orientation]), fmt, orientation)


def red_blue(w: int = 64, h: int = 48) -> Image.Image:
    """Left half red, right half blue, a green bar along the top: every turn and flip of it differs."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2 :, 2] = 255
    a[: h // 4, :, 1] = 255
    return Image.fromarray(a)


def gradient(w: int, h: int) -> Image.Image:
    """Red = x, green = y: a crop's corners tell which region of the upright picture it is."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8))


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_image_turns_a_tagged_picture_upright(orientation, fmt):
    upright = red_blue()
    want = decode_image(encode(upright, fmt))
    got = decode_image(sideways(upright, orientation, fmt))
    assert got.size == want.size == (64, 48)
    assert np.abs(pixels(got) - pixels(want)).max() <= 3  # JPEG rounding only
    assert got.getexif().get(ORIENTATION) is None  # applied once: nothing left for a later step to apply again
    # the picture itself, not just its size: red on the left, blue on the right, green along the top
    a = pixels(got)
    assert a[30, 5, 0] > 200 and a[30, 5, 2] < 50 and a[30, 60, 2] > 200 and a[30, 60, 0] < 50
    assert a[2, 30, 1] > 200 and a[40, 30, 1] < 50


def test_decode_image_with_a_draft_size_keeps_the_orientation():
    """Evaluation decodes large JPEGs at a reduced DCT scale: the tag still applies."""
    upright = red_blue(640, 480)
    want = decode_image(encode(upright), draft_size=64)
    got = decode_image(sideways(upright, 6), draft_size=64)
    assert got.size == want.size and got.size[0] < 640  # drafted
    assert np.abs(pixels(got) - pixels(want)).max() <= 3


@pytest.mark.parametrize("orientation", [5, 6, 7, 8, 3])
def test_eval_transform_and_load_eval_image_see_the_upright_picture(tmp_path, orientation):
    from blip2_train.data.eval_sets import load_eval_image

    upright, t = red_blue(), EvalTransform(32)
    (tmp_path / "upright.jpg").write_bytes(encode(upright))
    (tmp_path / "tagged.jpg").write_bytes(sideways(upright, orientation))
    want = load_eval_image(str(tmp_path / "upright.jpg"), t)
    for got in (load_eval_image(str(tmp_path / "tagged.jpg"), t),            # a path
                load_eval_image((tmp_path / "tagged.jpg").read_bytes(), t),  # encoded bytes (shards)
                load_eval_image(Image.open(tmp_path / "tagged.jpg"), t),     # a PIL image the caller opened
                t(Image.open(tmp_path / "tagged.jpg").convert("RGB"))):      # the transform on its own
        assert (got - want).abs().max() < 0.05
    # the control: the same stored pixels without their tag are not the upright picture
    bare = Image.open(tmp_path / "tagged.jpg").convert("RGB")
    bare.info.pop("exif")
    assert (t(bare) - want).abs().max() > 1.0


def corners(out: torch.Tensor) -> list[float]:
    """Red at the middle row's ends, green at the middle column's ends, in 0-255."""
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    x = (out * std + mean) * 255
    n = x.shape[-1]
    return [x[0, n // 2, 0].item(), x[0, n // 2, -1].item(), x[1, 0, n // 2].item(), x[1, -1, n // 2].item()]


@pytest.mark.parametrize("orientation", sorted(STORED))
@pytest.mark.parametrize("draft", [True, False])
def test_training_crop_box_is_drawn_on_the_upright_picture(orientation, draft):
    """The fast path reads the crop box from the header's size, before decoding: for orientations 5-8 the stored
    width is the upright height. Seed for seed, the crop of a tagged picture is the crop `crop_box` draws on the
    upright picture (the same region: its corners' colours), drafted (1/2 or 1/4 scale) or not."""
    w, h = 800, 608
    data = sideways(gradient(w, h), orientation)
    t = TrainTransform(64, hflip=False)
    for seed in range(6):
        x0, y0, x1, y1 = t.crop_box(w, h, random.Random(seed))
        step_x, step_y = (x1 - x0) / 64, (y1 - y0) / 64  # centres of the first and last output pixels
        want = [(x0 + step_x / 2) / (w - 1) * 255, (x1 - step_x / 2) / (w - 1) * 255,
                (y0 + step_y / 2) / (h - 1) * 255, (y1 - step_y / 2) / (h - 1) * 255]
        got = corners(t.decode(data, random.Random(seed), draft=draft))
        assert max(abs(g - v) for g, v in zip(got, want)) < 3.0, (seed, got, want)


@pytest.mark.parametrize("orientation", [6, 8, 5])
def test_fast_and_exact_training_paths_of_a_tagged_photo_match_the_upright_file(orientation):
    """As tests/unit/test_data_transforms.py compares them: the exact path (full decode) to the plain reference on
    the upright file (full decode, crop, PIL bicubic) within 3 uint8 levels inside (a filter's level plus the two
    files' JPEG rounding), the fast path (reduced decoding) close on average; and a tagged PNG (no reduced
    decoding, lossless) to the upright PNG exactly."""
    rng = np.random.default_rng(orientation)
    w, h = 640, 480
    base = Image.fromarray(rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    upright, tagged = encode(base), sideways(base, orientation)
    t = TrainTransform(224)
    for seed in range(4):
        ref = TrainTransform(224, resize="pil")(decode_image(upright), random.Random(seed))
        exact = t.decode(tagged, random.Random(seed), draft=False)
        assert (exact - ref)[:, 3:-3, 3:-3].abs().max() < 0.05 and (exact - ref).abs().mean() < 0.003
        fast = t.decode(tagged, random.Random(seed))
        assert (fast - ref).abs().mean() < 0.05
        png = t.decode(sideways(base, orientation, "PNG"), random.Random(seed))
        assert torch.equal(png, t.decode(encode(base, "PNG"), random.Random(seed)))


def test_shards_keep_the_tag_and_training_from_them_sees_the_upright_picture(tmp_path):
    """build_shards stores a JPEG's bytes untouched (its tag with them) and re-encodes other formats upright; the
    training decoder of a shard sample then gives the upright picture either way."""
    from blip2_train.data.annotations import ImageRecord
    from blip2_train.data.decode import SampleDecoder, SkipCounter
    from blip2_train.data.shards import build_shards

    upright = red_blue(256, 192)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "phone.jpg").write_bytes(sideways(upright, 6))
    (tmp_path / "img" / "scan.png").write_bytes(sideways(upright, 8, "PNG"))
    records = [ImageRecord("phone.jpg", "1", ["a red and blue card"]), ImageRecord("scan.png", "2", ["a card"])]
    build_shards(records, tmp_path / "img", tmp_path / "shards", progress=False)
    with tarfile.open(next((tmp_path / "shards").glob("*.tar"))) as tar:
        jpgs = [tar.extractfile(m).read() for m in sorted(tar.getmembers(), key=lambda m: m.name)
                if m.name.endswith(".jpg")]
    assert jpgs[0] == (tmp_path / "img" / "phone.jpg").read_bytes()
    t = TrainTransform(64, hflip=False, min_scale=1.0, max_scale=1.0)
    decoder = SampleDecoder(t)
    want = t.decode(encode(upright), random.Random(0))
    for data in jpgs:
        sample = decoder({"jpg": data, "json": json.dumps({"caption": "a card"}).encode(), "__key__": "k"},
                         random.Random(0), SkipCounter())
        assert (sample["image"] - want).abs().mean() < 0.02
