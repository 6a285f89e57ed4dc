"""load_image: faithful conversion of every container, and one-line errors for hostile input."""
from __future__ import annotations

import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageCms, ImageFilter, PngImagePlugin

import hostile
from decode_paths import libjpeg_pixels, pillow_only, png_pixels
from anomaly import imageio
from anomaly.imageio import MAX_PIXELS, ImageLoadError, load_image, load_pixels, to_float

FAILING = {name: reason for name, reason in hostile.expected_reasons().items() if reason}
LOADING = [name for name, reason in hostile.expected_reasons().items() if reason is None]


def assert_valid_array(array: np.ndarray, shape: tuple[int, int] | None = None) -> None:
    assert array.dtype == np.float32 and array.ndim == 3 and array.shape[2] == 3
    assert array.flags.c_contiguous and array.min() >= 0.0 and array.max() <= 1.0
    if shape is not None:
        assert array.shape[:2] == shape


def load_error(data: bytes, name: str) -> str:
    with pytest.raises(ImageLoadError) as info:
        load_image(data, name)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


@pytest.mark.parametrize("name", sorted(FAILING))
def test_hostile_files_fail_with_one_line(name: str) -> None:
    message = load_error(hostile.hostile_files()[name], name)
    assert message.startswith(f"{name}: ") and FAILING[name] in message


@pytest.mark.parametrize("name", LOADING)
def test_unusual_files_load(name: str, tmp_path) -> None:
    path = tmp_path / name
    path.write_bytes(hostile.hostile_files()[name])
    from_disk = load_image(path)
    assert_valid_array(from_disk)
    np.testing.assert_array_equal(from_disk, load_image(path.read_bytes(), name))


def test_exact_messages() -> None:
    assert load_error(b"", "a.png") == "a.png: empty file"
    assert load_error(hostile.decompression_bomb_png(), "bomb.png") == (
        "bomb.png: image too large: 2,500,000,000 pixels exceeds the 40,000,000-pixel limit")
    assert load_error(hostile.decompression_bomb_png(8000, 6000), "big.png") == (
        "big.png: image too large: 8000x6000 pixels exceeds the 40,000,000-pixel limit")


def test_disk_errors_name_the_path(tmp_path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(ImageLoadError, match="missing.png: file not found$"):
        load_image(missing)
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path, "folder")


@pytest.mark.parametrize("name", ["ünïcödé 画像.png", "with space.png", "../up.png", "<b>html</b>",
                                  "[md](x)", "two\nlines\r.png"])
def test_names_are_echoed_on_one_line(name: str) -> None:
    message = load_error(hostile.text_file(), name)
    assert message.endswith(": not an image (looks like text)")
    assert message.startswith(name.replace("\n", "\\n").replace("\r", "\\r"))


def test_error_is_a_picklable_value_error() -> None:
    error = ImageLoadError("x.png", "empty file")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "x.png: empty file" and copy.reason == "empty file"


# --- size limits ---------------------------------------------------------------------------------

def test_size_is_checked_before_decoding(monkeypatch) -> None:
    # The pixel data is cut short: decoding would report corruption, so "too large" proves the
    # header alone was used.
    data = hostile.png_from_rows(10, 10, 8, 0, bytes(range(110)))[:-20]
    monkeypatch.setattr(imageio, "MAX_PIXELS", 99)
    assert load_error(data, "x.png") == "x.png: image too large: 10x10 pixels exceeds the 99-pixel limit"
    monkeypatch.setattr(imageio, "MAX_PIXELS", 100)
    assert load_error(data, "x.png") == "x.png: truncated or corrupt image data"


def test_pillow_bomb_warning_becomes_our_error_and_leaks_nothing(recwarn) -> None:
    before_filters, before_limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    message = load_error(hostile.decompression_bomb_png(10_000, 10_000), "w.png")
    assert message == "w.png: image too large: 100,000,000 pixels exceeds the 40,000,000-pixel limit"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == before_filters and Image.MAX_IMAGE_PIXELS == before_limit
    assert MAX_PIXELS <= Image.MAX_IMAGE_PIXELS


def test_concurrent_loads_keep_warning_filters_intact() -> None:
    before = list(warnings.filters)
    cases = [hostile.decompression_bomb_png(10_000, 10_000), hostile.rgb_png()] * 8

    def attempt(data: bytes) -> str:
        try:
            return str(load_image(data).shape)
        except ImageLoadError as error:
            return error.reason

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, cases))
    assert results == [results[0], results[1]] * 8 and "too large" in results[0]
    assert warnings.filters == before


def test_tiny_and_extreme_aspect() -> None:
    np.testing.assert_allclose(load_image(hostile.tiny_png())[0, 0], np.array([10, 20, 30]) / 255, atol=1e-7)
    assert_valid_array(load_image(hostile.extreme_aspect_png()), (5000, 5))


# --- faithful conversion ---------------------------------------------------------------------------

def test_same_gray_picture_in_every_container() -> None:
    expected = np.repeat(hostile.gray8()[..., None] / 255.0, 3, axis=2)
    for data in (hostile.gray_png8(), hostile.gray_png16(), hostile.gray_float_tiff(), hostile.la_png()):
        np.testing.assert_allclose(load_image(data), expected, atol=1e-6, rtol=0)


def test_same_rgb_picture_in_every_container() -> None:
    expected = hostile.noise_rgb() / 255.0
    for data in (hostile.rgb_png(), hostile.rgb_png16(), hostile.rgba_opaque_png()):
        np.testing.assert_allclose(load_image(data), expected, atol=1e-6, rtol=0)


def test_pixels_are_the_image_before_its_float_conversion() -> None:
    """8-bit pictures stay uint8 until the caller converts them; the rest are load_image's floats."""
    for data, dtype in [(hostile.rgb_png(), np.uint8), (hostile.gray_png8(), np.uint8), (hostile.palette_png(), np.uint8),
                        (hostile.cmyk_jpeg(), np.uint8), (hostile.exif_rotated_jpeg(), np.uint8),
                        (hostile.gray_png16(), np.float32), (hostile.rgba_half_png(), np.float32),
                        (hostile.gray_float_tiff(), np.float32)]:
        pixels = load_pixels(data)
        assert pixels.dtype == dtype and pixels.ndim == 3 and pixels.shape[2] == 3
        np.testing.assert_array_equal(to_float(pixels), load_image(data))


def test_transparent_pixels_become_black() -> None:
    loaded = load_image(hostile.rgba_half_png())
    assert not loaded[:, :16].any()
    np.testing.assert_allclose(loaded[:, 16:], hostile.noise_rgb()[:, 16:] / 255.0, atol=1e-6)


def test_palette_lookup_and_palette_transparency() -> None:
    image = hostile.palette_image()
    palette = np.array(image.getpalette()[:48], dtype=np.float64).reshape(-1, 3) / 255.0
    indices = np.asarray(image)
    np.testing.assert_allclose(load_image(hostile.palette_png()), palette[indices], atol=1e-6)
    expected = palette[indices] * (indices != 0)[..., None]
    assert (indices == 0).any()
    np.testing.assert_allclose(load_image(hostile.palette_transparent_png()), expected, atol=1e-6)


def test_int32_and_float_ranges() -> None:
    np.testing.assert_allclose(load_image(hostile.int32_tiff())[0, :, 0], [0, 2**30 / (2**31 - 1), 1], atol=1e-6)
    wild = np.array([[-1.0, 0.25, 7.0, np.nan]], dtype=np.float32)
    np.testing.assert_allclose(load_image(hostile.encode(Image.fromarray(wild), "TIFF"))[0, :, 0],
                               [0, 0.25, 1, 0])


def test_cmyk_jpeg_colours() -> None:
    loaded = load_image(hostile.cmyk_jpeg())
    np.testing.assert_allclose(loaded[8, 4], [0, 1, 1], atol=0.03)   # cyan
    np.testing.assert_allclose(loaded[8, 28], [1, 1, 1], atol=0.03)  # white


def test_exif_orientation_is_applied() -> None:
    loaded = load_image(hostile.exif_rotated_jpeg())
    stored = np.zeros((16, 32, 3))
    stored[:, :16, 0] = 1.0
    stored[:, 16:, 2] = 1.0
    expected = np.rot90(stored, k=-1)  # orientation 6 = rotate 90 degrees clockwise for display
    assert loaded.shape == expected.shape == (32, 16, 3)
    inner = (slice(4, 12), slice(4, 12))
    np.testing.assert_allclose(loaded[inner], expected[inner], atol=0.05)
    np.testing.assert_allclose(loaded[20:28, 4:12], expected[20:28, 4:12], atol=0.05)


def test_first_frame_is_used() -> None:
    np.testing.assert_allclose(load_image(hostile.animated_gif()), np.broadcast_to([1.0, 0, 0], (6, 8, 3)))
    np.testing.assert_allclose(load_image(hostile.multipage_tiff()), np.broadcast_to([0, 1.0, 0], (6, 8, 3)))


# --- grey pictures kept grey ---------------------------------------------------------------------------

@pytest.mark.parametrize("data", [hostile.gray_png8(), hostile.gray_png16(), hostile.gray_float_tiff(),
                                  hostile.encode(Image.fromarray(hostile.gray8()), "JPEG")],
                         ids=["8-bit PNG", "16-bit PNG", "float TIFF", "JPEG"])
def test_grey_pictures_can_come_back_as_their_one_channel(data: bytes) -> None:
    grey, rgb = load_pixels(data, keep_grey=True), load_pixels(data)
    assert grey.ndim == 2 and rgb.shape == (*grey.shape, 3) and grey.dtype == rgb.dtype
    np.testing.assert_array_equal(rgb, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("data", [hostile.rgb_png(), hostile.la_png(), hostile.palette_png()],
                         ids=["RGB", "grey and alpha, composited", "palette"])
def test_other_pictures_stay_rgb_when_grey_is_kept(data: bytes) -> None:
    np.testing.assert_array_equal(load_pixels(data, keep_grey=True), load_pixels(data))
    assert load_pixels(data, keep_grey=True).ndim == 3


# --- plain PNGs and JPEGs, decoded without Pillow --------------------------------------------------------------

def png_with(image: Image.Image, **chunks: bytes) -> bytes:
    info = PngImagePlugin.PngInfo()
    for kind, payload in chunks.items():
        info.add(kind.encode(), payload)
    return hostile.encode(image, "PNG", pnginfo=info)


def smooth_picture(width: int = 157, height: int = 123) -> Image.Image:
    return Image.fromarray(hostile.noise_rgb(width, height, seed=5)).filter(ImageFilter.SMOOTH_MORE)


XMP_TURNED = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
              '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def plain_files() -> dict[str, tuple[bytes, Callable[[bytes], np.ndarray | None]]]:
    rgb, gray, picture = Image.fromarray(hostile.noise_rgb(61, 47)), Image.fromarray(hostile.gray8()), smooth_picture()
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "a camera")
    text.add_text("Comment", "compressed " * 50, zip=True)
    text.add_itxt("Title", "ünïcödé")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    pngs = {
        "rgb": hostile.encode(rgb, "PNG"),
        "grey": hostile.encode(gray, "PNG"),
        "large, many IDAT chunks": hostile.encode(Image.fromarray(hostile.noise_rgb(700, 500, seed=3)), "PNG"),
        "text": hostile.encode(rgb, "PNG", pnginfo=text),
        "colour management": hostile.encode(rgb, "PNG", icc_profile=srgb, dpi=(300, 300)),
        "gamma, chromaticities, significant bits, background, time": png_with(
            rgb, gAMA=struct.pack(">I", 45455), cHRM=struct.pack(">8I", *range(31270, 31278)), sBIT=bytes([5, 6, 5]),
            bKGD=struct.pack(">3H", 1, 2, 3), tIME=struct.pack(">HBBBBB", 2026, 11, 30, 12, 0, 0)),
        "sRGB intent, grey significant bits": png_with(gray, sRGB=b"\0", sBIT=b"\5"),
    }
    jpegs = {
        "grey": hostile.encode(picture.convert("L"), "JPEG"),
        "4:4:4": hostile.encode(picture, "JPEG", subsampling=0, quality=95),
        "4:2:0": hostile.encode(picture, "JPEG", subsampling=2, quality=75),
        "optimised": hostile.encode(picture, "JPEG", optimize=True),
        "restart markers": hostile.encode(picture, "JPEG", restart_marker_blocks=3),
        "EXIF, upright": hostile.encode(picture, "JPEG", exif=exif_orientation(1)),
    }
    return {**{f"PNG, {name}": (data, png_pixels) for name, data in pngs.items()},
            **{f"JPEG, {name}": (data, libjpeg_pixels) for name, data in jpegs.items()}}


@pytest.mark.parametrize("name", list(plain_files()))
def test_plain_files_are_decoded_by_the_fast_paths_as_pillow_decodes_them(name: str) -> None:
    data, fast = plain_files()[name]
    pixels = fast(data)
    assert pixels is not None, "left to Pillow"
    expected = pillow_only(data, keep_grey=True)
    assert pixels.dtype == expected.dtype == np.uint8 and pixels.shape == expected.shape
    assert pixels.ndim == (2 if "grey" in name else 3)
    np.testing.assert_array_equal(pixels, expected)
    np.testing.assert_array_equal(load_pixels(data), pillow_only(data))


def two_runs_of_pixel_data() -> bytes:
    """A 4 x 3 RGB PNG whose pixel data is split by a text chunk: Pillow reads only the first run."""
    data = zlib.compress(bytes(3 * 13))
    first = hostile.png_from_rows(4, 3, 8, 2, b"", idat=data[:10])
    rest = hostile.png_chunk(b"tEXt", b"Comment\0between") + hostile.png_chunk(b"IDAT", data[10:])
    return first[:-12] + rest + first[-12:]


def other_files() -> dict[str, tuple[bytes, Callable[[bytes], np.ndarray | None]]]:
    """Files Pillow reads differently (an orientation: 16 x 32 pictures that display 32 x 16), or that
    are unusual or damaged."""
    rgb, upright = Image.fromarray(hostile.noise_rgb(12, 10)), Image.fromarray(hostile.noise_rgb(32, 16))
    raw = PngImagePlugin.PngInfo()
    exif = exif_orientation(6).tobytes()
    raw.add_text("Raw profile type exif", f"\nexif\n{len(exif) + 6:8d}\n" + (b"Exif\0\0" + exif).hex())
    xmp = PngImagePlugin.PngInfo()
    xmp.add_itxt("XML:com.adobe.xmp", XMP_TURNED)
    plain = hostile.encode(rgb, "PNG")
    text = hostile.png_chunk(b"tEXt", b"Comment\0hello")
    pngs = {
        "orientation in eXIf": hostile.encode(upright, "PNG", exif=exif_orientation(6)),
        "orientation in XMP": hostile.encode(upright, "PNG", pnginfo=xmp),
        "orientation in a raw profile": hostile.encode(upright, "PNG", pnginfo=raw),
        "transparent colour": hostile.encode(rgb, "PNG", transparency=(0, 0, 0)),
        "16-bit": hostile.rgb_png16(), "palette": hostile.palette_png(), "alpha": hostile.rgba_opaque_png(),
        "grey and alpha": hostile.la_png(),
        "animated": hostile.encode(rgb, "PNG", save_all=True, append_images=[rgb.rotate(90)]),
        "unknown chunk": hostile.with_png_chunk(plain, hostile.png_chunk(b"prVt", b"private")),
        "wrong checksum on a text chunk": hostile.with_png_chunk(plain, text[:-1] + bytes([text[-1] ^ 1])),
        "cut before its end": plain[:-12],
        "too large": hostile.decompression_bomb_png(10_000, 10_000),
        "pixel data that does not inflate": hostile.png_from_rows(4, 3, 8, 2, b"", idat=b"not zlib data at all"),
        "pixel data a row short": hostile.png_from_rows(4, 3, 8, 2, bytes(2 * 13)),
        "pixel data a byte too long": hostile.png_from_rows(4, 3, 8, 2, bytes(3 * 13 + 1)),
        "a filter type PNG does not define": hostile.png_from_rows(4, 3, 8, 2, bytes(13) + b"\5" + bytes(25)),
        "two runs of pixel data": two_runs_of_pixel_data(),
    }
    upright = smooth_picture(32, 16)
    jpegs = {
        "orientation in EXIF": hostile.encode(upright, "JPEG", exif=exif_orientation(6)),
        "orientation in XMP": hostile.encode(upright, "JPEG", xmp=XMP_TURNED.encode()),
        "CMYK": hostile.cmyk_jpeg(),
        "progressive": hostile.encode(upright, "JPEG", progressive=True),
        "data after its end": hostile.encode(upright, "JPEG") + b"trailing bytes",
        "cut short in its pixel data": hostile.encode(smooth_picture(), "JPEG")[:-200],
    }
    return {**{f"PNG, {name}": (data, png_pixels) for name, data in pngs.items()},
            **{f"JPEG, {name}": (data, libjpeg_pixels) for name, data in jpegs.items()}}


@pytest.mark.parametrize("name", list(other_files()))
def test_other_files_are_left_to_pillow(name: str) -> None:
    data, fast = other_files()[name]
    assert fast(data) is None
    try:
        expected = pillow_only(data)
    except ImageLoadError as error:
        assert load_error(data, "x") == f"x: {error.reason}"
    else:
        np.testing.assert_array_equal(load_pixels(data), expected)
        if "orientation" in name:
            assert expected.shape == (32, 16, 3)


def test_pixel_data_that_does_not_inflate_gets_pillows_message() -> None:
    data = other_files()["PNG, pixel data that does not inflate"][0]
    assert load_error(data, "x.png") == "x.png: truncated or corrupt image data"


def test_fast_decoders_work_on_threads_side_by_side() -> None:
    files = [hostile.encode(Image.fromarray(hostile.noise_rgb(200, 150, seed)), form)
             for seed in range(4) for form in ("PNG", "JPEG")]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(load_pixels, files))
    for data, pixels in zip(files, together):
        np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# --- property-based -------------------------------------------------------------------------------

PLAIN_SEEDS = [hostile.rgb_png(), hostile.gray_png8(), hostile.encode(Image.fromarray(hostile.noise_rgb()), "JPEG"),
               hostile.encode(Image.fromarray(hostile.gray8()), "JPEG"),
               hostile.encode(Image.fromarray(hostile.gray8()), "JPEG", progressive=True)]  # left to Pillow


def _mutations(seeds: list[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """Valid files with bytes flipped, cut or appended: far likelier than noise to reach decoders."""
    seeds = seeds or PLAIN_SEEDS + [
        hostile.gray_png16(), hostile.animated_gif(), hostile.multipage_tiff(), hostile.cmyk_jpeg(),
        hostile.exif_rotated_jpeg(), hostile.encode(Image.new("RGB", (4, 4)), "BMP"),
        hostile.encode(Image.new("RGB", (4, 4)), "WEBP")]

    @st.composite
    def mutate(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 6))):
            position = draw(st.integers(0, len(data) - 1))
            data[position] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))]) + draw(st.binary(max_size=8))

    return mutate()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about corrupt metadata in garbage input
@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=256), _mutations()), name=st.text(max_size=20))
def test_arbitrary_bytes_only_raise_image_load_error(data: bytes, name: str) -> None:
    try:
        array = load_image(data, name)
    except ImageLoadError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message
        assert message.startswith(imageio.printable(name) + ": ")
    else:
        assert_valid_array(array)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None)
@given(data=_mutations(PLAIN_SEEDS))
def test_damaged_plain_files_give_what_pillow_alone_gives(data: bytes) -> None:
    """The fast decoders accept and refuse exactly what Pillow does, with the same pixels or message."""
    def outcome(load: Callable[[], np.ndarray]) -> np.ndarray | str:
        try:
            return load()
        except ImageLoadError as error:
            return error.reason

    fast, alone = outcome(lambda: load_pixels(data)), outcome(lambda: pillow_only(data))
    if isinstance(alone, str):
        assert fast == alone
    else:
        np.testing.assert_array_equal(fast, alone)


@settings(max_examples=60, deadline=None)
@given(pixels=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 4]))))
def test_png_round_trip_is_exact(pixels: np.ndarray) -> None:
    channels = pixels.shape[2]
    if channels == 4:
        pixels[..., 3] = 255
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    loaded = load_image(hostile.encode(image, "PNG"))
    expected = np.repeat(pixels[..., :1], 3, axis=2) if channels == 1 else pixels[..., :3]
    np.testing.assert_array_equal(loaded, expected.astype(np.float32) / np.float32(255))
