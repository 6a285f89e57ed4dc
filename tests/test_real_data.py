"""Integration on the real datasets in ../shared/datasets (skipped when absent).

Small subsets keep this quick; the full figures come from `python -m anomaly evaluate`
(see README). The bounds are far below those figures: they catch a broken pipeline,
not a slightly worse one.
"""

from __future__ import annotations

import numpy as np
import pytest

from anomaly.datasets import load_mask, load_mvtec_category
from anomaly.metrics import image_roc_auc, pixel_roc_auc
from anomaly.spade import SPADE

from decode_paths import libjpeg_pixels, png_pixels, pillow_only
from imagegen import DATASETS, requires_dataset


def every(items, step):
    return items[::step]


@requires_dataset("mvtec_bottle_448")
def test_bottle_image_level_separates_defects(efficientnet):
    category = load_mvtec_category(DATASETS / "mvtec_bottle_448")
    model = SPADE(extractor=efficientnet, k=10, calibration_images=0).fit(every(category.train, 5))
    test = every(category.test, 3)
    results = list(model.score([t.item for t in test]))
    assert all(r.error is None for r in results)
    labels = np.array([t.label for t in test])
    auroc = image_roc_auc(labels, np.array([r.score for r in results]))
    assert auroc > 0.85, auroc


@requires_dataset("magnetic_tile")
def test_magnetic_tile_maps_localise_defects(efficientnet):
    category = load_mvtec_category(DATASETS / "magnetic_tile")
    model = SPADE(extractor=efficientnet, k=10, calibration_images=0).fit(every(category.train, 10))
    defects = [t for t in category.test if t.label == 1 and t.defect in ("blowhole", "crack")][::8]
    results = list(model.score([t.item for t in defects], maps=True))
    masks = [load_mask(t.mask, r.size) for t, r in zip(defects, results)]
    for result in results:
        assert result.anomaly_map.shape == result.size and np.isfinite(result.anomaly_map).all()
    auroc = pixel_roc_auc(masks, [r.anomaly_map for r in results])
    assert auroc > 0.75, auroc


@pytest.mark.parametrize("folder, pattern", [pytest.param(folder, pattern, marks=requires_dataset(folder))
                                             for folder, pattern in [("magnetic_tile", "*.jpg"),
                                                                     ("magnetic_tile/ground_truth", "*.png"),
                                                                     ("mvtec_bottle_448", "*.png")]])
def test_real_files_take_the_fast_decoders_and_get_pillows_pixels(folder, pattern):
    """Every real image goes through the fast paths (libjpeg-turbo, `anomaly.png`) and gives Pillow's array;
    magnetic_tile's masks are grey PNGs."""
    paths = sorted((DATASETS / folder).rglob(pattern))
    paths = [path for path in paths if "ground_truth" not in path.relative_to(DATASETS / folder).parts][::3]
    assert paths
    decoded = {}
    for path in paths:
        fast = (png_pixels if pattern == "*.png" else libjpeg_pixels)(path.read_bytes())
        assert fast is not None, path
        decoded[path] = fast
    for path, fast in decoded.items():
        np.testing.assert_array_equal(fast, pillow_only(path.read_bytes(), keep_grey=True), err_msg=str(path))
