"""The SPADE equations, end to end, against an independent numpy computation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from anomaly.backbones import FeatureExtractor
from anomaly.bank import BankError
from anomaly.features import load
from anomaly.sources import InputItem, collect_inputs
from anomaly.spade import SPADE

from imagegen import png_bytes, texture, write_images


def memory_item(name: str, array: np.ndarray) -> InputItem:
    return InputItem(path=name, relpath=name, source=None, data=png_bytes(array))


@pytest.fixture(scope="module")
def small_resnet18(random_resnet18):
    """The same network at a 96 px input, so brute force over all pixel pairs stays small."""
    identity = dataclasses.replace(random_resnet18.identity, image_size=96)
    return FeatureExtractor(random_resnet18.net, identity, random_resnet18.pyramid_channels, random_resnet18.global_dim)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, small_resnet18):
    folder = tmp_path_factory.mktemp("train")
    write_images(folder, range(7))
    model = SPADE(extractor=small_resnet18, k=3, kappa=2, precision="fp32", batch_size=3, calibration_images=3)
    reports = {"fit": [], "calibrate": []}
    model.fit(collect_inputs([folder]).items, progress=lambda *done: reports["fit"].append(done),
              calibration_progress=lambda *done: reports["calibrate"].append(done))
    # Both stages report as they start, so that a progress bar's clock and rate count all of their work.
    assert reports == {"fit": [(0, 7), (3, 7), (6, 7), (7, 7)], "calibrate": [(0, 3), (1, 3), (2, 3), (3, 3)]}
    return model


def reference_features(extractor, item):
    loaded = load(item, extractor.identity)
    with torch.inference_mode():
        global_, pyramid = extractor(loaded.tensor[None])
    return global_[0].double().numpy(), pyramid, loaded.size


def stacked(levels):
    finest = levels[0].shape[-2:]
    parts = [levels[0]] + [F.interpolate(l, size=finest, mode="bilinear", align_corners=False) for l in levels[1:]]
    return torch.cat(parts, 1)[0].double().numpy()  # (C, h, w)


def test_image_and_pixel_scores_match_brute_force(fitted):
    model, bank = fitted, fitted.bank
    item = memory_item("test.png", texture(100, size=120, defect=True))
    result = model.explain(item)
    f, pyramid, size = reference_features(model.extractor, item)

    # Image level: mean squared distance to the K nearest normal global features (eq. 2).
    d_all = ((bank.global_features.astype(np.float64) - f) ** 2).sum(1)
    nearest = np.argsort(d_all)[: model.k]
    assert set(result.neighbours.tolist()) == set(nearest.tolist())
    np.testing.assert_allclose(result.neighbour_distances, np.sort(d_all)[: model.k], rtol=1e-4)
    np.testing.assert_allclose(result.knn_score, d_all[nearest].mean(), rtol=1e-4)
    assert result.score == result.knn_score

    # Pixel level: every query pixel against all pixels of the K neighbours (float16 bank), kappa nearest.
    query = stacked(pyramid)
    channels, h, w = query.shape
    gallery = np.concatenate(
        [stacked([torch.from_numpy(np.asarray(level[n : n + 1], np.float32)) for level in bank.pyramid])
         .reshape(channels, -1).T for n in nearest]
    )
    q = query.reshape(channels, -1).T
    d = (q**2).sum(1)[:, None] + (gallery**2).sum(1)[None] - 2 * q @ gallery.T  # float64
    raw = np.sort(d, axis=1)[:, : model.kappa].mean(1).reshape(h, w)
    levels = [level[0] for level in pyramid]
    np.testing.assert_allclose(model.raw_map(levels, result.neighbours).numpy(), raw, rtol=1e-4)

    # Post-processing: upsample to the network input, Gaussian sigma 4, then to the original size.
    side = bank.identity.image_size
    up = F.interpolate(torch.from_numpy(raw)[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)
    smooth = gaussian_filter(up[0, 0].numpy(), sigma=4)
    full = F.interpolate(torch.from_numpy(smooth)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    assert result.anomaly_map.shape == (120, 120) and result.anomaly_map.dtype == np.float32
    np.testing.assert_allclose(result.anomaly_map, full.numpy(), rtol=1e-4, atol=1e-6)
    assert result.map_max == pytest.approx(float(full.max()), rel=1e-4)


def test_leave_one_out_scores_exclude_self(fitted):
    bank = fitted.bank
    g = bank.global_features.astype(np.float64)
    d = ((g[:, None] - g[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    want = np.sort(d, axis=1)[:, : bank.loo_k].mean(1)
    np.testing.assert_allclose(bank.loo_scores, want, rtol=1e-4)
    assert bank.suggested_tau() == pytest.approx(np.quantile(want, 0.99), rel=1e-4)
    assert len(bank.loo_map_max) == 3 and bank.suggested_theta() > 0


def test_map_max_image_score_and_bf16_agree(fitted):
    item = memory_item("x.png", texture(5, size=64))
    exact = fitted.explain(item)
    model = SPADE.from_bank(fitted.bank, extractor=fitted.extractor, k=3, kappa=2, image_score="map-max",
                            precision="bf16")
    approx = model.explain(item)
    assert approx.score == approx.map_max
    np.testing.assert_allclose(approx.anomaly_map, exact.anomaly_map, rtol=0.02, atol=1e-3)


def test_defect_scores_higher_than_normal(fitted):
    normal = fitted.explain(memory_item("n.png", texture(50)))
    defect = fitted.explain(memory_item("d.png", texture(50, defect=True)))
    assert defect.knn_score > normal.knn_score
    assert defect.map_max > normal.map_max


def test_unreadable_inputs_keep_their_place_in_the_batch(fitted):
    items = [memory_item("a.png", texture(1)),
             InputItem(path="bad.png", relpath="bad.png", source=None, data=b"not an image"),
             memory_item("c.png", texture(2))]
    results = list(fitted.score(items))
    assert [r.path for r in results] == ["a.png", "bad.png", "c.png"]
    assert results[1].error.startswith("bad.png: ") and results[1].score is None
    assert results[0].error is None and results[2].error is None


def test_k_is_clipped_to_the_bank_and_single_image_bank(tmp_path, random_resnet18):
    write_images(tmp_path, [0])
    model = SPADE(extractor=random_resnet18, k=50).fit(collect_inputs([tmp_path]).items)
    result = model.explain(memory_item("t.png", texture(3)))
    assert len(result.neighbours) == 1
    assert model.suggested_tau() is None and model.bank.suggested_theta() is None


def test_parameters_are_validated_early():
    for bad in [dict(k=0), dict(kappa=0), dict(k=2.5), dict(image_score="mean"), dict(sigma=float("nan")),
                dict(precision="fp8"), dict(batch_size=0)]:
        with pytest.raises(ValueError):
            SPADE(**bad)


def test_fit_with_no_readable_image_is_a_clear_error(random_resnet18):
    bad = InputItem(path="x.png", relpath="x.png", source=None, data=b"")
    with pytest.raises(BankError, match="no normal image could be read"):
        SPADE(extractor=random_resnet18).fit([bad])


def test_concurrent_scoring_from_threads_matches_sequential(fitted):
    """A fitted model (shared extractor, bank and faiss index) serves several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    items = [memory_item(f"{seed}.png", texture(seed, defect=seed % 2 == 0)) for seed in range(30, 36)]
    sequential = [fitted.explain(item) for item in items]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(fitted.explain, items))
    for a, b in zip(sequential, parallel):
        assert a.knn_score == b.knn_score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
