"""Robust image decoding: any common file -> 8-bit RGB PIL image, or BrokenImageError."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS", "MAX_PIXELS", "BrokenImageError", "EncodedJPEG", "decode_image", "is_image_file", "load_image",
    "load_image_or_jpeg", "to_rgb",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
"""Lower-case file extensions treated as images (compare with ``ext.lower()``)."""

MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
"""Images with more pixels are rejected as decompression bombs (None: no own limit).

PIL's own ``Image.MAX_IMAGE_PIXELS`` still applies on top of this; to accept larger
images raise both.
"""

_WHITE = (255, 255, 255)
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class BrokenImageError(ValueError):
    """A file that cannot be decoded into an image."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def is_image_file(name: str) -> bool:
    """True when ``name`` has one of the IMAGE_EXTENSIONS (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: str | os.PathLike) -> Image.Image:
    """Fully decode the first frame of ``path`` and return it as an RGB image.

    Raises BrokenImageError for empty, truncated, oversized or non-image files; an
    OSError from opening the file itself (missing file, no permission) propagates.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise BrokenImageError(path, "zero-byte file")
        return _decode(f, path)


class EncodedJPEG:
    """The bytes of a colour JPEG left undecoded for the training device (``data.decode=device``),
    with its size read from the header: ``data`` (1-D uint8 tensor), ``width``, ``height``."""

    def __init__(self, data: bytes, width: int, height: int):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.width, self.height = width, height


def load_image_or_jpeg(path: str | os.PathLike) -> "Image.Image | EncodedJPEG":
    """``load_image``, except that a complete 3-channel (YCbCr) JPEG comes back undecoded as an
    ``EncodedJPEG`` once its header has been read and checked: the training device decodes it
    (nvJPEG). Anything else (PNG, grey or CMYK JPEGs, a JPEG without its end marker, which is
    how a truncated file looks) is decoded here as ``load_image`` does, so a broken file is still
    found and skipped in the worker."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise BrokenImageError(path, "zero-byte file")
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(data))
                _check_pixels(path, head.size)
                if head.format == "JPEG" and head.mode == "RGB":
                    return EncodedJPEG(data, *head.size)
        except BrokenImageError:
            raise
        except Exception:       # left to the full decode below, which names the problem
            pass
    return _decode(io.BytesIO(data), path)


def decode_image(data: bytes, name: str) -> Image.Image:
    """``load_image`` for bytes already in memory (a tar member); ``name`` names it in errors."""
    if not data:
        raise BrokenImageError(name, "zero-byte file")
    return _decode(io.BytesIO(data), name)


def _decode(f, path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            _check_pixels(path, img.size)
            img.load()
            return to_rgb(img)
    except BrokenImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BrokenImageError(path, f"decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise BrokenImageError(path, "not an image (unrecognised content)") from e
    except MemoryError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BrokenImageError(path, f"cannot decode: {type(e).__name__}: {e}") from e


def _check_pixels(path: str | os.PathLike, size: tuple[int, int]) -> None:
    if MAX_PIXELS is not None and size[0] * size[1] > MAX_PIXELS:
        raise BrokenImageError(
            path,
            f"decompression bomb: {size[0]}x{size[1]} = {size[0] * size[1]} pixels "
            f"exceeds MAX_PIXELS={MAX_PIXELS}",
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB.

    Transparency is composited on white; 16/32-bit and float data are rescaled
    (not clipped) to 0..255.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Rescale a single-channel 16-bit, 32-bit int or float image to uint8."""
    a = np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        full = 65535.0
        lo = 0.0
    elif img.mode == "I":
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        if lo >= 0 and hi <= 65535:  # 16-bit data widened to 32-bit by the decoder
            full, lo = 65535.0, 0.0
        else:
            full = float(hi - lo) or 1.0
    else:  # "F"
        a = np.nan_to_num(a.astype(np.float64))
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            full, lo = 1.0, 0.0
        elif lo >= 0.0 and hi <= 255.0:
            full, lo = 255.0, 0.0
        else:
            full = (hi - lo) or 1.0
    out = (a.astype(np.float64) - lo) * (255.0 / full)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
