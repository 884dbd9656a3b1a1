"""BLIP-2 image transforms on PIL (torchvision is optional here: its registry wheel breaks beside CPU torch).

Train: RandomResizedCrop(scale=(0.5, 1), bicubic) + horizontal flip + CLIP mean/std.
Eval: bicubic resize to a square.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from blip2_train.models.vision import CLIP_MEAN, CLIP_STD


# Decompression-bomb guard: PIL only warns between 1x and 2x its limit. We make any image above
# `max_pixels` a hard error so a 20000x20000 JPEG is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 2


class ImageDecodeError(ValueError):
    """The bytes are not a usable image (corrupt, truncated, too large, too small)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Bytes -> RGB PIL image, or ImageDecodeError with the reason.

    `draft_size`: let libjpeg decode at a reduced DCT scale that still covers this many pixels per side:
    much faster for large photos that are cropped and resized to 224/364 anyway.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"image of {w}x{h} pixels exceeds the decompression-bomb limit of {max_pixels}")
            if min(w, h) < MIN_SIDE:
                raise ImageDecodeError(f"image of {w}x{h} pixels is too small")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image exceeds the decompression-bomb limit ({e})") from e
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image: not an image format PIL knows ({len(data)} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, RGBA (on white) and 16-bit images -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo + 1e-12) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return background
    return img.convert("RGB")


def to_normalized_tensor(img: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return arr.sub_(m).div_(s)


@dataclass
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> random horizontal flip -> normalize."""

    image_size: int = 224
    min_scale: float = 0.5
    max_scale: float = 1.0
    hflip: bool = True

    @property
    def draft_size(self) -> int:
        # The smallest crop side (sqrt of min area share) must still cover image_size after decode.
        return int(math.ceil(self.image_size / math.sqrt(self.min_scale)))

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target_area = area * rng.uniform(self.min_scale, self.max_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x0 = rng.randint(0, width - w)
                y0 = rng.randint(0, height - h)
                return x0, y0, x0 + w, y0 + h
        # Fallback as torchvision: central crop with the aspect ratio clamped into range.
        in_ratio = width / height
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        x0, y0 = (width - w) // 2, (height - h) // 2
        return x0, y0, x0 + w, y0 + h

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        box = self.crop_box(*img.size, rng)
        img = img.resize((self.image_size, self.image_size), Image.BICUBIC, box=box)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(img)


@dataclass
class EvalTransform:
    """Bicubic resize to image_size x image_size (no crop), as the reference's eval processor."""

    image_size: int = 224

    @property
    def draft_size(self) -> int:
        return self.image_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_normalized_tensor(img.resize((self.image_size, self.image_size), Image.BICUBIC))
