"""The search layer against brute force numpy on small cases."""

import numpy as np
import pytest
import torch

from anomaly import search


def brute_force(queries: np.ndarray, gallery: np.ndarray, kappa: int) -> np.ndarray:
    d = ((queries.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, :kappa]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kappa", [1, 3])
def test_pixel_knn_matches_brute_force(precision, kappa, monkeypatch):
    monkeypatch.setattr(search, "GALLERY_TILE", 37)  # several tiles, one ragged
    monkeypatch.setattr(search, "QUERY_TILE", 50)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(130, 24)).astype(np.float32)
    gallery = rng.normal(size=(300, 24)).astype(np.float32)
    blocks = [torch.from_numpy(gallery[:120]), torch.from_numpy(gallery[120:])]
    got = search.pixel_knn(torch.from_numpy(queries), blocks, kappa=kappa, precision=precision).numpy()
    want = brute_force(queries, gallery, kappa)
    if precision == "fp32":
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        # bf16 only ranks candidates; returned values are exact distances to real gallery rows,
        # so they can only be >= the true nearest and rarely differ from it.
        assert np.all(got >= want - 1e-4)
        assert np.mean(np.isclose(got, want, rtol=1e-5, atol=1e-5)) > 0.97
        np.testing.assert_allclose(got, want, rtol=0.05)


def test_pixel_knn_exact_on_duplicates_and_zero_distance():
    gallery = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    got = search.pixel_knn(torch.from_numpy(np.eye(4, dtype=np.float32)), [torch.from_numpy(gallery)], 2, "fp32")
    np.testing.assert_array_equal(got.numpy(), np.zeros((4, 2), np.float32))


def test_pixel_knn_rejects_bad_kappa_and_precision():
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kappa"):
        search.pixel_knn(q, [q], kappa=0)
    with pytest.raises(ValueError, match="precision"):
        search.pixel_knn(q, [q], precision="fp8")


def test_knn_and_index_agree_with_brute_force():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    want = brute_force(queries, gallery, 7)
    d, i = search.knn(queries, gallery, 7)
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4)
    d2, i2 = search.build_index(gallery).search(queries, 7)
    np.testing.assert_array_equal(i, i2)
    assert search.knn(queries, gallery, 100)[0].shape == (5, 40)  # k clipped to the gallery
