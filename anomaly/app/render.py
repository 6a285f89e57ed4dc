"""Pictures for the dashboard as uint8 arrays: overlays, masks, thumbnails, PNG bytes.

Pure numpy and Pillow (no Streamlit), so they are easy to test and to reuse.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from plotly.colors import hex_to_rgb, sequential

from ..postprocess import normalise_for_display

_STOPS = np.array([hex_to_rgb(c) for c in sequential.Inferno], np.float64)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, c]) for c in range(3)], axis=1
).round().astype(np.uint8)


def opacity(level: np.ndarray | float) -> np.ndarray | float:
    """Overlay opacity for a display level in [0, 1]: low scores stay see-through, high ones cover the image."""
    return 0.85 * np.asarray(level) ** 0.6


OVERLAY_COLOURSCALE = [
    [float(at), f"rgba({r:.0f},{g:.0f},{b:.0f},{opacity(at):.3f})"]
    for at, (r, g, b) in zip(np.linspace(0, 1, len(_STOPS)), _STOPS)
]
"""Inferno with :func:`opacity` as alpha, for plotly heatmaps drawn over the image."""


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float image in [0, 1] as uint8."""
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def heat_overlay(picture: np.ndarray, anomaly_map: np.ndarray, high: float) -> np.ndarray:
    """A uint8 RGB picture blended with the map coloured from 0 to ``high`` (as the plotly overlay)."""
    level = normalise_for_display(anomaly_map, 0.0, high)
    heat = _LUT[np.rint(level * 255).astype(np.uint8)].astype(np.float32)
    alpha = opacity(level)[..., None]
    blended = (1 - alpha) * picture.astype(np.float32) + alpha * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def mask_picture(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as a black-and-white uint8 picture (white = anomalous)."""
    return np.where(mask, 255, 0).astype(np.uint8)


def shrink(picture: np.ndarray, max_side: int) -> np.ndarray:
    """A copy no larger than ``max_side`` on its longest side (for display and plotly)."""
    height, width = picture.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return picture
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.BILINEAR))


def thumbnail(square: np.ndarray, size: tuple[int, int], side: int = 160) -> np.ndarray:
    """A bank thumbnail (square uint8) back at its image's aspect ratio, longest side ``side``."""
    height, width = (int(v) for v in size)
    scale = side / max(height, width)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(np.asarray(square)).resize(target, Image.Resampling.BILINEAR))


def png_bytes(picture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(picture: np.ndarray, anomaly_map: np.ndarray, high: float) -> bytes:
    return png_bytes(heat_overlay(picture, anomaly_map, high))


def mask_png(mask: np.ndarray) -> bytes:
    return png_bytes(mask_picture(mask))
