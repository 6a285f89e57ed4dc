"""Generators of hostile and unusual input files, built on the fly (no binary fixtures).

Each function returns the file's bytes. `hostile_files()` maps a file name to content for
tests that write them to a folder; its keys are single path components (safe to write
under a tmp dir). `expected_reasons()` says, for the same names, which should load (None)
and which must fail with a message containing the given text. Names with "/" (such as
"../evil.png") only make sense inside zips: see `zip_bytes` and `HOSTILE_MEMBER_NAMES`.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image

TRICKY_NAMES = ("ünïcödé 画像.png", "with space.png", "<b>html<b>.png", "<img src=x onerror=alert(1)>.png",
                "[md](x).png", "sub\\..\\..\\evil.png", "-dash.png")
HOSTILE_MEMBER_NAMES = ("../evil.png", "/abs.png", "a/../../up.png", "..\\win\\evil.png", "C:/drive.png")


# --- small helpers -------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise_rgb(width: int = 32, height: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk, its checksum right."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, raw: bytes,
                  idat: bytes | None = None) -> bytes:
    """A PNG written by hand, so the header can claim anything (raw = filter-prefixed scanlines;
    ``idat``: the compressed data as it is, whatever it holds)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(raw, 9) if idat is None else idat) + png_chunk(b"IEND", b""))


def with_png_chunk(data: bytes, chunk: bytes) -> bytes:
    """``data`` (a PNG) with ``chunk`` inserted just after its header chunk."""
    at = 8 + 12 + struct.unpack_from(">I", data, 8)[0]
    return data[:at] + chunk + data[at:]


def png16_rgb(pixels8: np.ndarray) -> bytes:
    """16-bit RGB PNG of an 8-bit picture (value * 257), which Pillow cannot write itself."""
    rows = (pixels8.astype(">u2") * 257).reshape(pixels8.shape[0], -1)
    return png_from_rows(pixels8.shape[1], pixels8.shape[0], 16, 2,
                         b"".join(b"\x00" + row.tobytes() for row in rows))


# --- unreadable files ------------------------------------------------------------------------

def empty_file() -> bytes:
    return b""


def truncated_png() -> bytes:
    data = encode(Image.fromarray(noise_rgb(64, 64)), "PNG")
    return data[: len(data) // 2]


def truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(noise_rgb(64, 64)), "JPEG", quality=95)
    return data[: len(data) // 2]


def random_bytes(size: int = 512, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def text_file() -> bytes:
    return "Just some notes.\nNot an image at all — really.\n".encode()


def html_file() -> bytes:
    return b"<!DOCTYPE html>\n<html><body><img src=x onerror=alert(1)></body></html>\n"


def svg_file() -> bytes:
    return (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10" fill="red"/></svg>\n')


def decompression_bomb_png(width: int = 50_000, height: int = 50_000, rows: int = 4) -> bytes:
    """Tiny file whose IHDR declares width x height 8-bit gray pixels; only `rows` rows of data."""
    return png_from_rows(width, height, 8, 0, (b"\x00" * (width + 1)) * rows)


# --- unusual but valid images ------------------------------------------------------------------

def animated_gif() -> bytes:
    """Two frames: red then blue; only the red first frame must be used."""
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    """Two pages: green then grey; only the green first page must be used."""
    pages = [Image.new("RGB", (8, 6), colour) for colour in ((0, 255, 0), (128, 128, 128))]
    return encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def gray8() -> np.ndarray:
    return noise_rgb(16, 12, seed=3)[..., 0]


def gray_png8() -> bytes:
    return encode(Image.fromarray(gray8()), "PNG")


def gray_png16() -> bytes:
    """Same picture as gray_png8 at 16 bits (value * 257)."""
    return encode(Image.fromarray(gray8().astype(np.uint16) * 257), "PNG")


def gray_float_tiff() -> bytes:
    """Same picture as gray_png8 as 32-bit float TIFF (value / 255)."""
    return encode(Image.fromarray(gray8().astype(np.float32) / np.float32(255)), "TIFF")


def int32_tiff() -> bytes:
    """32-bit integer gray TIFF using the full positive int32 range: 0, 2**30, 2**31 - 1."""
    values = np.array([[0, 2**30, 2**31 - 1]], dtype=np.int32)
    return encode(Image.fromarray(values), "TIFF")


def rgb_png() -> bytes:
    return encode(Image.fromarray(noise_rgb()), "PNG")


def rgb_png16() -> bytes:
    return png16_rgb(noise_rgb())


def rgba_opaque_png() -> bytes:
    pixels = np.concatenate([noise_rgb(), np.full((24, 32, 1), 255, np.uint8)], axis=2)
    return encode(Image.fromarray(pixels), "PNG")


def rgba_half_png() -> bytes:
    """Alpha 0 on the left half, 255 on the right: the left half must come out black."""
    alpha = np.zeros((24, 32, 1), np.uint8)
    alpha[:, 16:] = 255
    return encode(Image.fromarray(np.concatenate([noise_rgb(), alpha], axis=2)), "PNG")


def la_png() -> bytes:
    """Gray + opaque alpha: must equal gray_png8."""
    return encode(Image.fromarray(np.stack([gray8(), np.full_like(gray8(), 255)], axis=2), "LA"), "PNG")


def palette_image() -> Image.Image:
    return Image.fromarray(noise_rgb()).quantize(colors=16)


def palette_png() -> bytes:
    return encode(palette_image(), "PNG")


def palette_transparent_png() -> bytes:
    """Palette PNG where index 0 is transparent: those pixels must come out black."""
    image = palette_image()
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    """Left half pure cyan, right half white (CMYK 0,0,0,0)."""
    image = Image.new("CMYK", (32, 16), (0, 0, 0, 0))
    image.paste((255, 0, 0, 0), (0, 0, 16, 16))
    return encode(image, "JPEG", quality=95)


def exif_rotated_jpeg() -> bytes:
    """Stored 32 wide x 16 high, left half red, right half blue, EXIF orientation 6 (rotate 90 CW).

    Displayed it is 16 wide x 32 high with red on top and blue below.
    """
    image = Image.new("RGB", (32, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif)


def tiny_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


def extreme_aspect_png() -> bytes:
    return encode(Image.fromarray(noise_rgb(5, 5000)), "PNG")


# --- collections -----------------------------------------------------------------------------

def hostile_files() -> dict[str, bytes]:
    """File name -> content for every case; names are single path components."""
    files = {
        "empty.png": empty_file(),
        "truncated.png": truncated_png(),
        "truncated.jpg": truncated_jpeg(),
        "random.png": random_bytes(),
        "notes.txt": text_file(),
        "page.html": html_file(),
        "drawing.svg": svg_file(),
        "bomb.png": decompression_bomb_png(),
        "animated.gif": animated_gif(),
        "pages.tiff": multipage_tiff(),
        "gray16.png": gray_png16(),
        "float32.tiff": gray_float_tiff(),
        "int32.tiff": int32_tiff(),
        "rgb16.png": rgb_png16(),
        "palette.png": palette_png(),
        "palette_transparent.png": palette_transparent_png(),
        "la.png": la_png(),
        "rgba.png": rgba_half_png(),
        "cmyk.jpg": cmyk_jpeg(),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "tiny.png": tiny_png(),
        "tall.png": extreme_aspect_png(),
    }
    files.update({name: rgb_png() for name in TRICKY_NAMES})
    return files


def expected_reasons() -> dict[str, str | None]:
    """For each name in hostile_files(): None if it loads, else text its error message contains."""
    failing = {
        "empty.png": "empty file",
        "truncated.png": "truncated or corrupt image data",
        "truncated.jpg": "truncated or corrupt image data",
        "random.png": "not an image",
        "notes.txt": "not an image (looks like text)",
        "page.html": "not an image (looks like HTML)",
        "drawing.svg": "not an image (looks like SVG)",
        "bomb.png": "image too large",
    }
    return {name: failing.get(name) for name in hostile_files()}


def zip_bytes(members: dict[str, bytes], directories: tuple[str, ...] = (),
              compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip built in memory; member names are stored exactly as given (even "../x" or "/abs")."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for directory in directories:
            archive.writestr(zipfile.ZipInfo(directory.rstrip("/") + "/"), b"")
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def zip_bomb(size: int = 300 * 1024**2, name: str = "zeros.png") -> bytes:
    """One member of `size` zero bytes (300 MB compresses to ~300 KB), streamed so it is never in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as member:
            block = bytes(1024**2)
            for start in range(0, size, len(block)):
                member.write(block[: min(len(block), size - start)])
    return buffer.getvalue()


def zip_with_lying_size(real: bytes, claimed: int, name: str = "liar.png") -> bytes:
    """A zip whose headers claim `claimed` uncompressed bytes while the member really holds `real`."""
    data = bytearray(zip_bytes({name: real}))
    true_size = struct.pack("<I", len(real))
    for offset in (_find(data, b"PK\x03\x04") + 22, _find(data, b"PK\x01\x02") + 24):
        assert data[offset:offset + 4] == true_size
        data[offset:offset + 4] = struct.pack("<I", claimed)
    return bytes(data)


def zip_marked_encrypted(name: str = "secret.png") -> bytes:
    """A zip whose only member has the "encrypted" flag set (zipfile cannot write real encryption)."""
    data = bytearray(zip_bytes({name: rgb_png()}))
    for offset in (_find(data, b"PK\x03\x04") + 6, _find(data, b"PK\x01\x02") + 8):
        data[offset] |= 0x1
    return bytes(data)


def corrupt_zip() -> bytes:
    """A real zip cut in half: the central directory is gone."""
    data = zip_bytes({"a.png": rgb_png(), "b.png": rgb_png()})
    return data[: len(data) // 2]


def _find(data: bytearray, signature: bytes) -> int:
    offset = data.find(signature)
    assert offset >= 0
    return offset
