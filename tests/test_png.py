"""`anomaly.png` against PNG's spec: pictures filtered here row by row with numpy, then decoded."""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import hostile
from anomaly import png


def paeth_reference(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The spec's predictor, as written there (section 9.4)."""
    a, b, c = (x.astype(np.int16) for x in (a, b, c))
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_rows(pixels: np.ndarray, kinds: list[int]) -> np.ndarray:
    """(H, 1 + row bytes) uint8: each row of ``pixels`` ((H, W) or (H, W, 3) uint8) filtered with its kind."""
    channels = 1 if pixels.ndim == 2 else 3
    rows = pixels.reshape(pixels.shape[0], -1).astype(np.int16)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
    for r, kind in enumerate(kinds):
        line = rows[r]
        above = rows[r - 1] if r else np.zeros_like(line)
        left = np.concatenate([np.zeros(channels, np.int16), line[:-channels]])
        upper_left = np.concatenate([np.zeros(channels, np.int16), above[:-channels]])
        predicted = [np.zeros_like(line), left, above, (left + above) // 2,
                     paeth_reference(left, above, upper_left)][kind]
        out[r, 0] = kind
        out[r, 1:] = (line - predicted) % 256
    return out


def encoded(pixels: np.ndarray, kinds: list[int]) -> bytes:
    colour = 0 if pixels.ndim == 2 else 2
    return hostile.png_from_rows(pixels.shape[1], pixels.shape[0], 8, colour, filtered_rows(pixels, kinds).tobytes())


def decoded(data: bytes) -> np.ndarray | None:
    stream = io.BytesIO(data)
    return png.decode_plain(stream, stream.read(1024), 10**8)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), grey=st.booleans())
def test_every_filter_is_undone(data: st.DataObject, grey: bool) -> None:
    shape = (data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)), *(() if grey else (3,)))
    pixels = data.draw(arrays(np.uint8, shape))
    kinds = data.draw(st.lists(st.integers(0, 4), min_size=shape[0], max_size=shape[0]))
    file = encoded(pixels, kinds)
    result = decoded(file)
    assert result is not None and result.dtype == np.uint8
    np.testing.assert_array_equal(result, pixels)
    np.testing.assert_array_equal(result, imagecodecs.png_decode(file))  # libpng, another decoder, agrees


@pytest.mark.parametrize("upper_kind", [0, 4], ids=["rows one at a time", "rows two at a time"])
def test_paeth_is_right_for_every_left_upper_and_upper_left_byte(upper_kind: int) -> None:
    """All 2^24 (a, b, c): row pairs whose upper row holds every (c, b) pair side by side and whose
    lower row's left byte a steps through all 256 values from one pair of rows to the next. Grey rows
    that both need their left neighbours are undone two at a time: Paeth upper rows make that path."""
    pair = np.arange(65536)
    upper = np.stack([pair >> 8, pair & 255], axis=1).reshape(-1).astype(np.uint8)  # c, b at columns 2m, 2m + 1
    rng = np.random.default_rng(0)
    rows = []
    for step in range(256):
        lower = rng.integers(0, 256, upper.size, dtype=np.uint8)
        lower[0::2] = (pair + step) % 256  # a, left of column 2m + 1
        rows += [upper, lower]
    pixels = np.stack(rows)
    filtered = filtered_rows(pixels, [upper_kind, 4] * 256)
    out = np.empty_like(pixels)
    assert png._unfilter(filtered, 1, out)
    np.testing.assert_array_equal(out, pixels)


def test_rgb_rows_use_each_channels_own_neighbours() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (40, 33, 3), dtype=np.uint8)
    pixels[::3, :, 1] = 0  # flat and busy channels side by side
    for kind in (1, 3, 4):
        np.testing.assert_array_equal(decoded(encoded(pixels, [kind] * 40)), pixels)


def test_damaged_or_unusual_pixel_data_is_left_to_pillow() -> None:
    good = np.zeros((3, 4, 3), np.uint8)
    rows = filtered_rows(good, [0, 1, 2]).tobytes()
    with_dictionary = zlib.compressobj(zdict=b"a preset dictionary")
    cases = {
        "not zlib": hostile.png_from_rows(4, 3, 8, 2, b"", idat=b"garbage"),
        "checksum of the data wrong": hostile.png_from_rows(4, 3, 8, 2, b"", idat=zlib.compress(rows)[:-1] + b"\0"),
        "a preset dictionary": hostile.png_from_rows(
            4, 3, 8, 2, b"", idat=with_dictionary.compress(rows) + with_dictionary.flush()),
        "a row short": hostile.png_from_rows(4, 3, 8, 2, rows[:-13]),
        "a byte too long": hostile.png_from_rows(4, 3, 8, 2, rows + b"\0"),
        "filter type 5": hostile.png_from_rows(4, 3, 8, 2, rows[:13] + b"\5" + rows[14:]),
        "filter type 5 after a grey row of Sub (grey rows are undone two at a time)": hostile.png_from_rows(
            4, 3, 8, 0, b"\1" + bytes(4) + b"\5" + bytes(4) + b"\0" + bytes(4)),
        "no pixel data": hostile.png_from_rows(4, 3, 8, 2, b"", idat=b"")[:33] + hostile.png_chunk(b"IEND", b""),
    }
    assert decoded(hostile.png_from_rows(4, 3, 8, 2, rows)) is not None
    for name, data in cases.items():
        assert decoded(data) is None, name


def test_pixel_data_may_be_split_over_many_chunks() -> None:
    pixels = np.random.default_rng(2).integers(0, 256, (9, 7), dtype=np.uint8)
    data = zlib.compress(filtered_rows(pixels, [4] * 9).tobytes())
    file = hostile.png_from_rows(7, 9, 8, 0, b"", idat=data[:5])
    chunks = b"".join(hostile.png_chunk(b"IDAT", data[i : i + 5]) for i in range(5, len(data), 5))
    file = file[:-12] + chunks + hostile.png_chunk(b"IDAT", b"") + file[-12:]
    np.testing.assert_array_equal(decoded(file), pixels)


WARM_UP_PROBE = """
import io, numpy as np
from PIL import Image
from anomaly import features, png, resample
from anomaly.imageio import load_pixels
loops = (png._unfilter, resample._resample)
assert not any(loop.signatures for loop in loops), "compiled before the warm-up"
features.warm_up()
compiled = [set(loop.signatures) for loop in loops]
assert all(compiled), "the warm-up left a loop uncompiled"
for pixels in (np.zeros((30, 20), np.uint8), np.full((20, 30, 3), 7, np.uint8)):
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, "PNG")
    resample.resize_rgb(load_pixels(stream.getvalue(), keep_grey=True), (8, 8))
assert [set(loop.signatures) for loop in loops] == compiled, "real images compiled more"
print("ok")
"""


def test_warming_up_compiles_what_real_decoding_and_resizing_use() -> None:
    """In a fresh interpreter: after `features.warm_up`, decoding and resizing real grey and RGB PNGs
    compiles nothing more."""
    done = subprocess.run([sys.executable, "-c", WARM_UP_PROBE], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
