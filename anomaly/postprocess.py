"""From a raw feature-resolution score map to a map the size of the user's image, and back to decisions.

Kept apart from the search so that smoothing, thresholds and display normalisation can
be changed without touching how the scores are computed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .features import resize

DEFAULT_SIGMA = 4.0
"""Gaussian smoothing in network-input pixels, as in the paper."""


def to_image_map(
    score_map: np.ndarray | torch.Tensor, input_size: int, output_size: tuple[int, int], sigma: float = DEFAULT_SIGMA
) -> np.ndarray:
    """Upsample a (h, w) score map to the network input, smooth it, then resize to the image's (H, W).

    Smoothing at network-input resolution makes sigma mean the same on every image size.
    """
    scores = torch.as_tensor(score_map, dtype=torch.float32)[None, None]
    at_input = resize(scores, (input_size, input_size))[0, 0].numpy()
    if sigma > 0:
        at_input = gaussian_filter(at_input, sigma=sigma, mode="reflect", truncate=4.0)
    full = resize(torch.from_numpy(np.ascontiguousarray(at_input))[None, None], output_size)
    return full[0, 0].numpy().astype(np.float32, copy=False)


def binary_mask(anomaly_map: np.ndarray, theta: float) -> np.ndarray:
    """Pixels whose score exceeds theta."""
    return anomaly_map > theta


def check_threshold(value: float | None, name: str) -> float | None:
    """A threshold must be a finite, non-negative number (scores are squared distances)."""
    if value is None:
        return None
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def normalise_for_display(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """Scale scores to [0, 1] between ``low`` and ``high`` (clipped) for colour maps."""
    span = max(high - low, 1e-12)
    return np.clip((anomaly_map - low) / span, 0.0, 1.0)
