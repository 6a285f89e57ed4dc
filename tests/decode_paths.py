"""What each of `anomaly.imageio`'s decoding paths makes of a file, for tests that compare them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from anomaly import imageio


def libpng_pixels(data: bytes) -> np.ndarray | None:
    """What the libpng path makes of ``data``, or None where it leaves the file to Pillow."""
    stream = io.BytesIO(data)
    return imageio._plain_png(stream, stream.read(1024))


def libjpeg_pixels(data: bytes) -> np.ndarray | None:
    """What the libjpeg path makes of ``data``, or None where it leaves the file to Pillow."""
    stream = io.BytesIO(data)
    with Image.open(stream) as image:
        return imageio._plain_jpeg(image, stream)


def pillow_only(data: bytes, keep_grey: bool = False) -> np.ndarray:
    """`imageio.load_pixels` with both fast paths turned off: Pillow alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(imageio, "_plain_png", lambda stream, head: None)
        patch.setattr(imageio, "_plain_jpeg", lambda image, stream: None)
        return imageio.load_pixels(data, keep_grey=keep_grey)
