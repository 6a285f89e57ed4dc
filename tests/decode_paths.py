"""What each of `anomaly.imageio`'s decoding paths makes of a file, for tests that compare them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from anomaly import imageio, png


def png_pixels(data: bytes) -> np.ndarray | None:
    """What `anomaly.png` makes of ``data``, or None where it leaves the file to Pillow."""
    stream = io.BytesIO(data)
    return png.decode_plain(stream, stream.read(1024), imageio.MAX_PIXELS)


def libjpeg_pixels(data: bytes) -> np.ndarray | None:
    """What the libjpeg path makes of ``data``, or None where it leaves the file to Pillow."""
    stream = io.BytesIO(data)
    with Image.open(stream) as image:
        return imageio._plain_jpeg(image, stream)


def pillow_only(data: bytes, keep_grey: bool = False) -> np.ndarray:
    """`imageio.load_pixels` with both fast paths turned off: Pillow alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(png, "decode_plain", lambda stream, head, max_pixels: None)
        patch.setattr(imageio, "_plain_jpeg", lambda image, stream: None)
        return imageio.load_pixels(data, keep_grey=keep_grey)
