"""The compiled resize against the float64 brute-force filter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from anomaly.resample import filter_taps, resize_rgb

from resize_reference import filter_weights, reference_resize


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 700), st.integers(1, 300))
def test_taps_hold_every_weight_of_the_filter(n_in, n_out):
    first, weights = filter_taps(n_in, n_out)
    assert first.min() >= 0 and first.max() + weights.shape[1] <= n_in
    dense = np.zeros((n_out, n_in))
    for row, (start, taps) in enumerate(zip(first, weights)):
        dense[row, start : start + len(taps)] = taps
    # 1e-12: a weight rounded away where a triangle ends
    np.testing.assert_allclose(dense, filter_weights(n_in, n_out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, size", [
    ((120, 100), (96, 96)), ((448, 448), (224, 224)), ((50, 70), (96, 40)), ((7, 9), (20, 3)),
    ((1, 1), (5, 5)), ((1, 300), (96, 96)), ((400, 5), (33, 96)), ((97, 300), (97, 300)),
])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_resize_is_the_exact_filter(shape, size, dtype):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3)).astype(dtype)
    if dtype == np.float32:
        image /= 255
    expected = reference_resize(image, size).transpose(2, 0, 1)
    got = resize_rgb(image, size)
    assert got.dtype == np.float32 and got.shape == (3, *size)
    np.testing.assert_allclose(got, expected, rtol=1.2e-7, atol=1e-12)


def test_each_channel_is_scaled_and_offset_before_rounding():
    image = np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)
    scale, offset = np.array([1 / 58.4, 1 / 57.1, 1 / 57.4]), np.array([-2.1, -2.0, -1.8])
    expected = reference_resize(image, (32, 48)).transpose(2, 0, 1) * scale[:, None, None] + offset[:, None, None]
    np.testing.assert_allclose(resize_rgb(image, (32, 48), scale, offset), expected, rtol=1.2e-7, atol=3e-7)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_a_grey_image_gives_its_rgb_copys_result_to_the_bit(dtype):
    grey = np.random.default_rng(3).integers(0, 256, (77, 131)).astype(dtype)
    scale, offset = np.array([0.017, 0.018, 0.019]), np.array([-2.1, -2.0, -1.8])
    for size in [(32, 48), (224, 224), (300, 20)]:
        np.testing.assert_array_equal(resize_rgb(grey, size, scale, offset),
                                      resize_rgb(np.repeat(grey[..., None], 3, axis=2), size, scale, offset))


def test_read_only_and_strided_images_read_as_their_values():
    image = np.random.default_rng(2).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    view = image[::2, ::3]
    expected = resize_rgb(np.ascontiguousarray(view), (16, 16))
    frozen = np.ascontiguousarray(view)
    frozen.flags.writeable = False
    np.testing.assert_array_equal(resize_rgb(view, (16, 16)), expected)
    np.testing.assert_array_equal(resize_rgb(frozen, (16, 16)), expected)


def test_threads_resize_side_by_side_as_one_would():
    images = [np.random.default_rng(seed).integers(0, 256, (300, 200, 3), dtype=np.uint8) for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda image: resize_rgb(image, (56, 56)), images))
    for image, got in zip(images, together):
        np.testing.assert_array_equal(got, resize_rgb(image, (56, 56)))


@pytest.mark.parametrize("shape, size", [((10, 10, 2), (4, 4)), ((10, 10, 4), (4, 4)), ((0, 10, 3), (4, 4)),
                                         ((10, 10, 3, 1), (4, 4)), ((10, 10, 3), (0, 4))])
def test_what_is_not_an_rgb_image_or_a_size_is_refused(shape, size):
    with pytest.raises(ValueError, match="image|size"):
        resize_rgb(np.zeros(shape, np.uint8), size)
