"""BLIP-2 image transforms on PIL (torchvision is optional here: its registry wheel breaks beside CPU torch).

Train: RandomResizedCrop(scale=(0.5, 1), bicubic) + horizontal flip + CLIP mean/std.
Eval: bicubic resize to a square.

Every decode applies the EXIF orientation tag (as transformers' `load_image` does): a phone photo stored sideways
with "rotate 90" reaches the model upright, in training, evaluation, `blip2-generate` and the API alike. Shards
keep the JPEG bytes with their tag, so applying it here covers training from shards too.
"""

from __future__ import annotations

import functools
import io
import math
import random
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from blip2_train.models.vision import CLIP_MEAN, CLIP_STD


# Decompression-bomb guard: PIL only warns between 1x and 2x its limit. We make any image above
# `max_pixels` a hard error so a 20000x20000 JPEG is refused before its pixels are decoded.
DEFAULT_MAX_PIXELS = 64_000_000
MIN_SIDE = 2


class ImageDecodeError(ValueError):
    """The bytes are not a usable image (corrupt, truncated, too large, too small)."""


@contextmanager
def image_errors(n_bytes: int):
    """Whatever PIL raises while opening or decoding -> ImageDecodeError with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image exceeds the decompression-bomb limit ({e})") from e
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"cannot decode image: not an image format PIL knows ({n_bytes} bytes)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from e


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> a PIL image whose header is read and checked, pixels not decoded yet (call inside image_errors)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError(f"image of {w}x{h} pixels exceeds the decompression-bomb limit of {max_pixels}")
    if min(w, h) < MIN_SIDE:
        raise ImageDecodeError(f"image of {w}x{h} pixels is too small")
    return img


# EXIF orientation (tag 0x0112) -> the transposition that makes the stored pixels upright (PIL's exif_transpose)
ORIENTATION_TAG = 0x0112
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_INVERSE = {Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
            Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90}  # the other five undo themselves
_SWAPS_SIDES = (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                Image.Transpose.ROTATE_270)


def orientation_transpose(img: Image.Image) -> Image.Transpose | None:
    """The transposition the image's EXIF orientation asks for, None when it is upright (or has no tag).
    For JPEG the tag is in the header, so this works before the pixels are decoded."""
    try:
        orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF is metadata we cannot use, not an unusable image
        return None
    return EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied, the tag removed (so it is never applied
    twice); the same image when there is nothing to apply."""
    return img if orientation_transpose(img) is None else ImageOps.exif_transpose(img)


def upright_size(size: tuple[int, int], method: Image.Transpose | None) -> tuple[int, int]:
    return (size[1], size[0]) if method in _SWAPS_SIDES else size


def transpose_box(box: tuple, size: tuple[int, int], method: Image.Transpose | None) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) in an image of `size` -> the same region's box after `img.transpose(method)`."""
    if method is None:
        return tuple(box)
    x0, y0, x1, y1 = box
    w, h = size
    return {
        Image.Transpose.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1),
        Image.Transpose.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
        Image.Transpose.ROTATE_180: (w - x1, h - y1, w - x0, h - y0),
        Image.Transpose.TRANSPOSE: (y0, x0, y1, x1),
        Image.Transpose.ROTATE_90: (y0, w - x1, y1, w - x0),  # counter-clockwise: (x, y) -> (y, w - x)
        Image.Transpose.ROTATE_270: (h - y1, x0, h - y0, x1),  # clockwise: (x, y) -> (h - y, x)
        Image.Transpose.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0),
    }[method]


def untranspose_box(box: tuple, stored_size: tuple[int, int],
                    method: Image.Transpose | None) -> tuple[int, int, int, int]:
    """A box in the upright image -> the same region's box in the stored pixels (the inverse of transpose_box)."""
    if method is None:
        return tuple(box)
    return transpose_box(box, upright_size(stored_size, method), _INVERSE.get(method, method))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Bytes -> upright RGB PIL image (EXIF orientation applied), or ImageDecodeError with the reason.

    `draft_size`: let libjpeg decode at a reduced DCT scale that still covers this many pixels per side:
    much faster for large photos that are resized to 224/364 anyway (a square request: the same scale whichever
    way the photo is turned).
    """
    with image_errors(len(data)):
        img = open_image(data, max_pixels)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        if orientation_transpose(img) is not None:
            ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img)


def draft_for_box(img: Image.Image, box: tuple, out_size: int) -> tuple[int, int, int, int]:
    """Reduced-size JPEG decoding for one crop: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain (decoding
    faster) when the crop box stays at least `out_size` pixels per side at that scale. Returns the box in the
    pixels of the image as it will be decoded: the same region, its edges rounded to that grid (< r/2 source
    pixels, with r >= 2 only for crops >= 2 x out_size)."""
    w, h = img.size
    side = min(box[2] - box[0], box[3] - box[1])
    r = next((r for r in (8, 4, 2) if side >= r * out_size), 1)
    if r == 1 or img.format != "JPEG":
        return box
    # PIL picks the scale from original // requested: asking for floor(w / r) gets 1/r for odd sizes too
    img.draft("RGB", (max(1, w // r), max(1, h // r)))
    sx, sy = img.size[0] / w, img.size[1] / h
    return round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)


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
    return normalize_uint8(uint8_chw(img), mean, std)


def uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] uint8 view of its pixels (channels-last strides; read only, never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the numpy array is not writable
        return torch.from_numpy(np.asarray(img, dtype=np.uint8)).permute(2, 0, 1)


def normalize_uint8(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """[3, H, W] uint8 -> (x / 255 - mean) / std as one fused multiply-add, contiguous float32."""
    scale, bias = _affine(tuple(mean), tuple(std))
    return torch.addcmul(bias, x.contiguous().float(), scale)


@functools.lru_cache(maxsize=8)
def _affine(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    std_t = torch.tensor(std).view(3, 1, 1)
    return 1.0 / (255.0 * std_t), -torch.tensor(mean).view(3, 1, 1) / std_t


@dataclass
class TrainTransform:
    """RandomResizedCrop(size, scale, ratio 3/4..4/3, bicubic) -> random horizontal flip -> normalize.

    `decode()` is the training path from bytes: the crop box is drawn in the source image's own pixel
    coordinates from its header (the same box, for the same RNG, as cropping the fully decoded image), then
    the pixels are decoded at the smallest JPEG scale that keeps the box >= image_size (`draft_for_box`).
    `resize="torch"` resizes the uint8 crop with torch's vectorised antialiased bicubic (PIL's filter, equal
    within rounding, ~4x faster than PIL's resize); "pil" is PIL's own. Neither changes which region is
    cropped: the speed-up is in how its pixels are decoded and filtered.

    The box is drawn on the upright image (EXIF orientation applied; orientations 5-8 swap width and height),
    mapped into the stored pixels for reduced decoding, and back once the decoded image is turned upright: the
    same box, for the same RNG, as cropping `decode_image`'s upright image."""

    image_size: int = 224
    min_scale: float = 0.5
    max_scale: float = 1.0
    hflip: bool = True
    resize: str = "torch"

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

    def decode(self, data: bytes, rng: random.Random, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: bool = True) -> torch.Tensor:
        """Bytes -> training tensor (ImageDecodeError if unusable); see the class docstring."""
        with image_errors(len(data)):
            img = open_image(data, max_pixels)
            if img.format != "JPEG":
                # no reduced decoding; and other formats may keep their EXIF after the pixels (PNG's eXIf)
                img.load()
                img, method = upright(img), None
                box = self.crop_box(*img.size, rng)
            else:
                method = orientation_transpose(img)  # a JPEG's EXIF is in its header: known before decoding
                box = self.crop_box(*upright_size(img.size, method), rng)
                if draft:
                    stored = draft_for_box(img, untranspose_box(box, img.size, method), self.image_size)
                    box = transpose_box(stored, img.size, method)  # img.size: the reduced size it decodes at
                img.load()
        img = to_rgb(img)
        return self.finish(img if method is None else img.transpose(method), box, rng)

    def finish(self, img: Image.Image, box: tuple[int, int, int, int], rng: random.Random) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        if self.resize == "pil":
            x = uint8_chw(img.resize(size, Image.BICUBIC, box=box))
        else:
            crop = uint8_chw(img)[None, :, box[1]:box[3], box[0]:box[2]]
            x = torch.nn.functional.interpolate(crop, size=size, mode="bicubic", antialias=True)[0]
        if self.hflip and rng.random() < 0.5:
            x = x.flip(-1)
        return normalize_uint8(x)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        img = upright(img)
        return self.finish(img, self.crop_box(*img.size, rng), rng)


@dataclass
class EvalTransform:
    """Bicubic resize to image_size x image_size (no crop), as the reference's eval processor; a PIL image that
    still carries an EXIF orientation tag (one opened by the caller) is turned upright first."""

    image_size: int = 224

    @property
    def draft_size(self) -> int:
        return self.image_size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        return to_normalized_tensor(upright(img).resize((self.image_size, self.image_size), Image.BICUBIC))
