"""Metrics checked against independent brute-force numpy implementations."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label as skimage_label
from sklearn.metrics import roc_auc_score

from anomaly.metrics import image_roc_auc, pixel_roc_auc, pro_score, roc_curve_points


def brute_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random anomalous sample outscores a random normal one (ties 1/2)."""
    pos = scores[labels == 1][:, None]
    neg = scores[labels == 0][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def brute_pro(masks: list[np.ndarray], maps: list[np.ndarray], max_fpr: float = 0.3) -> float:
    """MVTec PRO evaluated at every distinct score, one threshold at a time."""
    regions = []
    for mask, amap in zip(masks, maps):
        labelled = skimage_label(mask, connectivity=2)  # 8-connectivity
        regions += [amap[labelled == k] for k in range(1, labelled.max() + 1)]
    normals = np.concatenate([amap[~mask] for mask, amap in zip(masks, maps)])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([amap.ravel() for amap in maps]))[::-1]:
        points.append((np.mean(normals >= t), np.mean([np.mean(r >= t) for r in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def random_case(rng: np.random.Generator, n_images: int = 4, quantise: bool = False):
    """Blobby masks and noisy maps that are correlated with them, in varying image sizes."""
    masks, maps = [], []
    for _ in range(n_images):
        h, w = rng.integers(12, 30, size=2)
        mask = rng.random((h, w)) < 0.08
        for _ in range(2):
            mask |= np.roll(mask, 1, axis=int(rng.integers(2)))
        amap = (mask * rng.uniform(0.3, 1.0) + rng.normal(0, 0.5, (h, w))).astype(np.float32)
        if quantise:
            amap = np.round(amap * 4) / 4
        masks.append(mask)
        maps.append(amap)
    return masks, maps


def test_image_roc_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels, 1.0), 1)
    assert image_roc_auc(labels, scores) == pytest.approx(brute_auc(labels, scores), abs=1e-12)


def test_image_roc_auc_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="all 3 images are anomalous"):
        image_roc_auc(np.ones(3), np.arange(3.0))
    with pytest.raises(ValueError, match="0 .normal. or 1"):
        image_roc_auc(np.array([0, 2]), np.arange(2.0))
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_roc_auc(np.array([0, 1, 1]), np.arange(2.0))


def test_roc_curve_points_span_the_unit_square():
    labels = np.array([0, 0, 1, 1, 0, 1])
    fpr, tpr, thresholds = roc_curve_points(labels, np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9]))
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thresholds) == len(fpr)


@pytest.mark.parametrize("seed", range(5))
def test_pixel_roc_auc_equals_sklearn_on_concatenation(seed):
    masks, maps = random_case(np.random.default_rng(seed), quantise=seed % 2 == 0)
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps])
    )
    assert pixel_roc_auc(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert pixel_roc_auc([m.astype(np.uint8) * 255 for m in masks], maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_roc_auc_errors_name_the_problem():
    mask = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="all 16 pixels are normal"):
        pixel_roc_auc([mask], [np.zeros((4, 4))])
    with pytest.raises(ValueError, match="image 0 has mask shape \\(4, 4\\) but anomaly map shape \\(4, 5\\)"):
        pixel_roc_auc([mask], [np.zeros((4, 5))])
    with pytest.raises(ValueError, match="NaN"):
        pixel_roc_auc([mask], [np.full((4, 4), np.nan)])
    with pytest.raises(ValueError, match="1 masks but 2 anomaly maps"):
        pixel_roc_auc([mask], [mask, mask])


@pytest.mark.parametrize("seed", range(6))
def test_pro_matches_brute_force(seed):
    masks, maps = random_case(np.random.default_rng(100 + seed), quantise=seed % 2 == 0)
    expected = brute_pro(masks, maps)
    # with a threshold at every normal score the curve is exact; with 200 it is sampled
    assert pro_score(masks, maps, num_thresholds=100_000) == pytest.approx(expected, abs=1e-9)
    assert pro_score(masks, maps) == pytest.approx(expected, abs=1e-2)


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_pro_integration_limit(max_fpr):
    masks, maps = random_case(np.random.default_rng(7))
    assert pro_score(masks, maps, max_fpr, 100_000) == pytest.approx(brute_pro(masks, maps, max_fpr), abs=1e-9)


def test_pro_perfect_and_inverted_maps():
    masks, _ = random_case(np.random.default_rng(3))
    assert pro_score(masks, [m.astype(np.float32) for m in masks]) == pytest.approx(1.0)
    assert pro_score(masks, [1 - m.astype(np.float32) for m in masks]) == pytest.approx(0.0, abs=1e-6)


def test_pro_averages_regions_not_pixels_with_8_connectivity():
    mask = np.zeros((10, 10), bool)
    mask[1, 1] = mask[2, 2] = True  # diagonal neighbours: one region under 8-connectivity
    mask[5:9, 5:9] = True  # a 16-pixel region
    amap = np.where(mask, 0.0, 0.5).astype(np.float32)
    amap[1, 1] = 1.0  # half of the small region outscores all normals, none of the big one does
    # so for FPR in [0, 1) the PRO is mean(1/2, 0) = 1/4 (with 4-connectivity: mean(1, 0, 0) = 1/3)
    assert pro_score([mask], [amap]) == pytest.approx(0.25)


def test_pro_errors():
    mask = np.zeros((5, 5), bool)
    with pytest.raises(ValueError, match="PRO is undefined: all 25 pixels are normal"):
        pro_score([mask], [np.zeros((5, 5))])
    with pytest.raises(ValueError, match="all 25 pixels are anomalous"):
        pro_score([~mask], [np.zeros((5, 5))])
    with pytest.raises(ValueError, match="max_fpr"):
        pro_score([mask], [np.zeros((5, 5))], max_fpr=0)
