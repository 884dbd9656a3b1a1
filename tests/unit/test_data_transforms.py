"""The fast training transform (crop box from the JPEG header, reduced-size JPEG decoding, torch's antialiased
bicubic on uint8) crops the same region as the plain path (full decode, PIL bicubic) and its pixels match."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_train.data.shards import make_jpeg
from blip2_train.data.transforms import TrainTransform, decode_image
from blip2_train.models.vision import CLIP_MEAN, CLIP_STD


def photo_like(w: int, h: int, seed: int) -> bytes:
    """Smooth structure at several scales plus fine grain, quality 90: costs and compresses like a photo."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90.0), (16, 50.0), (64, 25.0)):
        noise = Image.fromarray(rng.uniform(0, 255, (cells * h // w + 1, cells, 3)).astype(np.uint8))
        img += (np.asarray(noise.resize((w, h), Image.BICUBIC), np.float32) - 128) * amp / 128
    img += rng.normal(0, 6, img.shape)
    return make_jpeg(Image.fromarray(np.clip(img + 128, 0, 255).astype(np.uint8)), quality=90)


def plain(t: TrainTransform, data: bytes, seed: int) -> torch.Tensor:
    """The reference: decode at full size, crop box drawn on the decoded image, PIL's bicubic resize."""
    return TrainTransform(t.image_size, t.min_scale, t.max_scale, t.hflip, resize="pil")(decode_image(data),
                                                                                         random.Random(seed))


@pytest.mark.parametrize("size", [(640, 480), (1280, 960)])  # 1280x960 crops are >= 2 x 224: JPEG draft at 1/2, 1/4
def test_fast_path_matches_the_plain_path(size):
    t = TrainTransform(224)
    drafted, same = [], []
    for seed in range(12):
        data = photo_like(*size, seed)
        ref = plain(t, data, seed)
        exact = t.decode(data, random.Random(seed), draft=False)
        inner = (exact - ref)[:, 3:-3, 3:-3].abs()
        # torch's antialiased bicubic is PIL's filter: one uint8 level inside (1/255/std ~ 0.015), the border
        # rows differ only in how far the filter reaches outside the box
        assert inner.max() < 0.02 and (exact - ref).abs().mean() < 0.002
        fast = t.decode(data, random.Random(seed))
        drafted.append((fast - ref).abs().mean().item())
        same.append(torch.equal(fast, exact))
    # a DCT-domain 1/2 or 1/4 downscale is another low-pass filter of the same region: close on average
    assert max(drafted) < 0.05
    # crops of 1280x960 at min_scale 0.5 are >= 678 px a side (all drafted at least 1/2); of 640x480, only
    # those >= 448 px a side are drafted (then at 1/2), the others decoded at full size
    assert any(same) and not all(same) if size[0] == 640 else not any(same)


@pytest.mark.parametrize("draft", [False, True])
def test_the_crop_box_is_drawn_in_source_pixels(draft):
    """A picture whose red channel is its x coordinate and green its y: the output's corners tell which box was
    cropped. Reduced decoding must crop the box `crop_box` draws on the source's own size, as the plain path:
    seed for seed the same box, hence the same distribution of crops (RandomResizedCrop's scale and ratio)."""
    w, h = 1600, 1200
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    data = make_jpeg(Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)), quality=95)
    t = TrainTransform(64, hflip=False)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    for seed in range(20):
        x0, y0, x1, y1 = t.crop_box(w, h, random.Random(seed))
        out = (t.decode(data, random.Random(seed), draft=draft) * std + mean) * 255
        step_x, step_y = (x1 - x0) / 64, (y1 - y0) / 64  # centres of the first and last output pixels
        want = [(x0 + step_x / 2) / (w - 1) * 255, (x1 - step_x / 2) / (w - 1) * 255,
                (y0 + step_y / 2) / (h - 1) * 255, (y1 - step_y / 2) / (h - 1) * 255]
        got = [out[0, 32, 0], out[0, 32, -1], out[1, 0, 32], out[1, -1, 32]]
        for g, wv in zip(got, want):
            assert abs(g.item() - wv) < 2.5, (seed, got, want)



@pytest.mark.parametrize("size", [(1280, 960), (1281, 961), (1287, 967)])
def test_odd_sized_jpegs_are_drafted_too(size):
    """The draft request is floor(w / r): PIL derives its scale from original // requested, so asking for the
    ceiling would fall back to full-size decoding for every odd width."""
    from blip2_train.data.transforms import draft_for_box, open_image

    img = open_image(photo_like(*size, seed=0))
    box = draft_for_box(img, (0, 0, size[0], size[1]), 224)  # a 960+ px side is >= 4 x 224: 1/4
    assert img.size == (-(-size[0] // 4), -(-size[1] // 4)), img.size
    assert box == (0, 0) + img.size
