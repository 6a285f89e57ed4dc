"""Dataset sanity checks on a normal bank and a scored batch (pure numpy, no Streamlit).

Distances are squared Euclidean distances between global features, recomputed exactly
for the pairs that faiss finds (the index's dot-product form is inexact near zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..bank import NormalBank
from ..spade import ImageResult

DUPLICATE_FRACTION = 0.02
"""A pair counts as a near-duplicate below this fraction of the typical nearest-normal distance."""


@dataclass(frozen=True)
class Pair:
    first: int
    second: int  # a bank index
    distance: float


def nearest_other(bank: NormalBank) -> tuple[np.ndarray, np.ndarray]:
    """For every normal image: (exact squared distance, index) of its nearest *other* normal image."""
    n = len(bank)
    if n < 2:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    _, found = bank.nearest(bank.global_features, min(n, 3))
    # Identical images can rank before the image itself: take the first hit that is not self.
    others = np.where(found[:, :1] == np.arange(n)[:, None], found[:, 1:2], found[:, :1])[:, 0]
    features = np.asarray(bank.global_features, np.float32)
    diff = features[others] - features
    return np.einsum("nd,nd->n", diff, diff), others


def typical_distance(nearest: np.ndarray) -> float:
    """Median nearest-other distance among normals: the yardstick for "near-duplicate"."""
    return float(np.median(nearest)) if len(nearest) else 0.0


def closest_pairs(distances: np.ndarray, others: np.ndarray) -> list[Pair]:
    """Unordered pairs of normal images, closest first, from :func:`nearest_other`'s output."""
    pairs = {tuple(sorted((i, int(j)))): float(d) for i, (d, j) in enumerate(zip(distances, others))}
    return sorted((Pair(a, b, d) for (a, b), d in pairs.items()), key=lambda p: p.distance)


def least_typical(loo_scores: np.ndarray) -> list[int]:
    """Bank indices by leave-one-out score, highest first (candidates for contamination)."""
    return [int(i) for i in np.argsort(-np.asarray(loo_scores), kind="stable")]


def train_test_pairs(results: Sequence[ImageResult]) -> list[Pair]:
    """Each readable test image with its nearest normal image, closest first (leakage check)."""
    pairs = [Pair(i, int(r.neighbours[0]), float(r.neighbour_distances[0]))
             for i, r in enumerate(results) if r.error is None and r.neighbours is not None and len(r.neighbours)]
    return sorted(pairs, key=lambda p: p.distance)


def size_table(sizes: np.ndarray) -> pd.DataFrame:
    """Distinct (height, width) with image counts and aspect ratio, commonest first."""
    pairs, counts = np.unique(np.asarray(sizes).reshape(-1, 2), axis=0, return_counts=True)
    table = pd.DataFrame({"height (px)": pairs[:, 0], "width (px)": pairs[:, 1], "images": counts})
    table["aspect (w/h)"] = (table["width (px)"] / table["height (px)"]).round(3)
    return table.sort_values("images", ascending=False, kind="stable").reset_index(drop=True)
