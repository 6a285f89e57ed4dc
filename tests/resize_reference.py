"""The resize filter by brute force in float64: every input weighed against every output."""

from __future__ import annotations

import numpy as np


def filter_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights with half-pixel centres, stretched to the input spacing when shrinking
    (antialiasing) and renormalised at the borders."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out)[:, None] + 0.5) * scale
    weights = np.clip(1 - np.abs(np.arange(n_in)[None, :] + 0.5 - centres) / support, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def reference_resize(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(rows, cols, C) float64 of an (H, W, C) image; ``size`` (rows, cols), or one side of a square."""
    rows, cols = (size, size) if isinstance(size, int) else size
    return np.einsum("ih,hwc,jw->ijc", filter_weights(image.shape[0], rows), image.astype(np.float64),
                     filter_weights(image.shape[1], cols), optimize=True)
