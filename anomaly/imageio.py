"""Load any user image as an RGB array, or fail with one readable line.

Every image that reaches the model goes through `load_image`, so the same picture must
give the same array whatever its container (8-bit, 16-bit, float, palette, opaque alpha),
and hostile input (bombs, truncated or non-image files) must end as an `ImageLoadError`,
never as a traceback.

Pillow reads every file, except the most common kinds, decoded into the array Pillow would make,
faster (``python bench/bench.py --section prepare``) and without holding the GIL, so decode threads do
not queue for it:

* an 8-bit grey or RGB PNG, not interlaced, with nothing in it that Pillow would apply (transparency,
  an orientation, animation) and nothing unusual (every chunk one Pillow keeps aside, every checksum
  right), by `anomaly.png`: libdeflate through imagecodecs, then PNG's row filters undone (lossless);
* a grey or RGB baseline JPEG that Pillow has opened and would not turn, complete (it ends with its
  end-of-image marker: libjpeg only warns of a file cut short, where Pillow refuses it), by
  libjpeg-turbo, the library Pillow decodes it with, at the same settings. Of 10,000 baseline JPEGs
  with bytes changed at random, both accepted and refused the same ones, with the same pixels.

Any file those paths refuse is read again by Pillow, which words the error.
"""
from __future__ import annotations

import io
import re
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import imagecodecs
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from anomaly import png

MAX_PIXELS: int = 40_000_000

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_PREMULTIPLIED = {"RGBa": "RGBA", "La": "LA"}  # Pillow converts these to RGB only via their straight form
_INT32_MAX = 2**31 - 1
_SNIFF_BYTES = 1024
# Image.open temporarily turns DecompressionBombWarning into an error; warnings.catch_warnings
# swaps process-wide state, so concurrent loads must not interleave their enter/exit.
_OPEN_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """An input that cannot be used as an image; str(e) == "<name>: <reason>" on one line."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = printable(name)
        self.reason = printable(reason)
        super().__init__(f"{self.name}: {self.reason}")

    def __reduce__(self):  # keep it picklable although __init__ takes two arguments
        return (type(self), (self.name, self.reason))


def printable(text: str) -> str:
    """Escape control characters (newlines included) so a message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def load_image(source: bytes | str | Path, name: str | None = None) -> np.ndarray:
    """float32 RGB array (H, W, 3) in [0, 1]; EXIF orientation applied; 8/16-bit/float/palette/L/LA/RGBA/CMYK
    converted faithfully (same picture in 8-bit, 16-bit or float, or with opaque alpha -> same array up to 1e-6);
    first frame of animated/multi-frame files; raises ImageLoadError for anything unreadable."""
    return to_float(load_pixels(source, name))


def load_pixels(source: bytes | str | Path, name: str | None = None, keep_grey: bool = False) -> np.ndarray:
    """`load_image` before its float conversion where the picture is 8-bit: uint8 RGB (H, W, 3), else the
    float32 array itself; ``to_float(load_pixels(x)) == load_image(x)`` exactly. A caller that resizes
    anyway (the feature extractor) then converts the image in one pass, in the layout it needs.

    ``keep_grey``: a grey picture (8-bit, 16-bit or float, without alpha) comes back as its one (H, W)
    channel, which `load_image` repeats three times: a caller that resizes it does a third of the work."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "image" if name is None else name
        pixels = _load_stream(io.BytesIO(bytes(source)), name)
    else:
        name = str(source) if name is None else name
        try:
            with open(source, "rb") as stream:
                pixels = _load_stream(stream, name)
        except OSError as exc:
            raise ImageLoadError(name, _os_reason(exc)) from None
    return pixels if keep_grey or pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)


def _load_stream(stream: BinaryIO, name: str) -> np.ndarray:
    """The picture as `load_pixels` with ``keep_grey`` returns it."""
    head = stream.read(_SNIFF_BYTES)
    if not head:
        raise ImageLoadError(name, "empty file")
    pixels = png.decode_plain(stream, head, MAX_PIXELS)
    if pixels is not None:
        return pixels
    stream.seek(0)
    image = _open_checked(stream, name, head)
    try:
        with image:
            pixels = _plain_jpeg(image, stream)
            if pixels is not None:
                return pixels
            # Image.open leaves animated GIF / multi-frame TIFF on their first frame.
            image = ImageOps.exif_transpose(image)  # decodes the pixels; corrupt data fails here
    except Exception:  # Pillow's decoders raise a zoo of types (OSError, ValueError, zlib/EOF errors...)
        raise ImageLoadError(name, "truncated or corrupt image data") from None
    return _to_pixels(image, name)


def _plain_jpeg(image: Image.Image, stream: BinaryIO) -> np.ndarray | None:
    """``image`` (opened by Pillow from ``stream``) as `_to_pixels` would return it, decoded by
    libjpeg-turbo, where it is a plain JPEG (see the module's docstring); else None."""
    if image.format != "JPEG" or image.mode not in ("L", "RGB") or image.info.get("progressive"):
        return None  # progressive: libjpeg finished a few damaged ones Pillow refuses (3 of 5,000 fuzzed)
    where, pixels = stream.tell(), None
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):  # exif_transpose turns 2-8
            stream.seek(0)
            data = stream.read()
            if data.endswith(b"\xff\xd9"):
                pixels = _checked(imagecodecs.jpeg8_decode(data), image.size, grey=image.mode == "L")
    except Exception:  # Pillow decodes it, or says what is wrong with it
        pixels = None
    if pixels is None:
        stream.seek(where)
    return pixels


def _checked(pixels: np.ndarray, size: tuple[int, int], grey: bool) -> np.ndarray | None:
    """A decoded array, if it is 8-bit, grey or RGB as the header said, of its (width, height); else None."""
    width, height = size
    expected = (height, width) if grey else (height, width, 3)
    return pixels if pixels.dtype == np.uint8 and pixels.shape == expected else None


def _open_checked(stream: BinaryIO, name: str, head: bytes) -> Image.Image:
    """Identify the file and refuse oversized images from the header alone, before any decoding."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(match.group(1)):,} pixels" if match else "its pixel count"
        raise ImageLoadError(name, f"image too large: {size} exceeds the {MAX_PIXELS:,}-pixel limit") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, _not_an_image_reason(head)) from None
    except Exception:  # a recognised format with a broken header
        raise ImageLoadError(name, "truncated or corrupt image data") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise ImageLoadError(
            name, f"image too large: {width}x{height} pixels exceeds the {MAX_PIXELS:,}-pixel limit"
        )
    if width < 1 or height < 1:
        image.close()
        raise ImageLoadError(name, f"image has no pixels ({width}x{height})")
    return image


def _to_pixels(image: Image.Image, name: str) -> np.ndarray:
    """The decoded image as `load_pixels` with ``keep_grey`` returns it: (H, W, 3), or (H, W) if grey."""
    mode = image.mode
    # High-bit modes are read before the alpha branch: Pillow has no 16-bit/float alpha modes, so a rare
    # tRNS colour key on a 16-bit PNG is ignored rather than losing the extra precision.
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image, dtype=np.float32) / np.float32(65535)
    if mode == "I":
        # 32-bit container: 16-bit content (non-negative, <= 65535) keeps the 16-bit scale so it matches
        # the same picture saved as I;16; anything wider is scaled by the int32 range, negatives clipped.
        values = np.asarray(image, dtype=np.int64)
        scale = 65535 if values.min() >= 0 and values.max() <= 65535 else _INT32_MAX
        return (np.clip(values, 0, None) / scale).astype(np.float32)
    if mode == "F":
        # Float images carry no range metadata; [0, 1] is the only convention we can assume. NaN -> 0.
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return np.clip(values, 0.0, 1.0)
    if mode in _ALPHA_MODES or image.has_transparency_data:
        # Transparent pixels are composited on black (colour x alpha): the colour hidden under
        # transparency is arbitrary (editors leave garbage there) and must not reach the model.
        # Fully opaque alpha multiplies by exactly 1.0, so the result equals the image without alpha.
        rgba = _convert(image.convert(_PREMULTIPLIED[mode]) if mode in _PREMULTIPLIED else image, "RGBA", name)
        values = np.asarray(rgba, dtype=np.float32) / np.float32(255)
        return np.ascontiguousarray(values[..., :3] * values[..., 3:])
    return np.asarray(image if mode == "L" else _convert(image, "RGB", name))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """`load_pixels`' array as `load_image`'s: uint8 divided by 255 in float32, float returned as it is."""
    if pixels.dtype == np.uint8:
        return np.divide(pixels, np.float32(255), dtype=np.float32)
    return pixels


def _convert(image: Image.Image, mode: str, name: str) -> Image.Image:
    if image.mode == mode:  # convert() would copy it
        return image
    try:
        return image.convert(mode)
    except ValueError:
        raise ImageLoadError(name, f"unsupported image mode {image.mode}") from None


def _not_an_image_reason(head: bytes) -> str:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "not an image (looks like SVG)"
    if text.startswith(b"<!doctype html") or b"<html" in text:
        return "not an image (looks like HTML)"
    if head.startswith(b"PK\x03\x04"):
        return "not an image (looks like a zip archive)"
    if _looks_like_text(head):
        return "not an image (looks like text)"
    return "not an image (unrecognised file format)"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the end of the sniffed block
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n\f" for c in text)


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"could not be read ({exc.strerror or type(exc).__name__})"
