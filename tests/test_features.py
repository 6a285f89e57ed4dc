"""Preparing images for the backbone: the resize filter against float64 brute force, and batching."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from anomaly import features
from anomaly.backbones import BackboneIdentity, FeatureExtractor
from anomaly.imageio import load_image
from anomaly.sources import InputItem

from imagegen import png_bytes
from resize_reference import reference_resize

IDENTITY = BackboneIdentity("wide_resnet50_2", "test", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), image_size=96)
SIZES = [(120, 100), (96, 96), (50, 70), (7, 9), (1, 1), (1, 300), (400, 5), (230, 225), (97, 300)]


def item(name: str, array: np.ndarray) -> InputItem:
    return InputItem(name, name, None, png_bytes(array))


def random_image(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", SIZES)
def test_prepared_input_is_the_exact_filter_normalised(shape):
    entry = item("x.png", random_image(shape))
    expected = (reference_resize(load_image(entry.data), 96) - IDENTITY.mean) / IDENTITY.std
    loaded = features.load(entry, IDENTITY)
    assert loaded.tensor.dtype == torch.float32 and loaded.tensor.shape == (3, 96, 96)
    assert loaded.size == shape
    np.testing.assert_allclose(loaded.tensor.permute(1, 2, 0).numpy(), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(120, 100), (50, 70), (230, 225)])
def test_prepared_input_agrees_with_the_torch_resize(shape):
    """`resize` (used for maps) and the input preparation apply the same filter; torch's float32
    kernel places its taps less precisely, hence the looser tolerance."""
    entry = item("x.png", random_image(shape, 1))
    image = torch.from_numpy(load_image(entry.data)).permute(2, 0, 1)[None]
    mean, std = torch.tensor(IDENTITY.mean).view(3, 1, 1), torch.tensor(IDENTITY.std).view(3, 1, 1)
    expected = (features.resize(image, (96, 96))[0] - mean) / std
    torch.testing.assert_close(features.load(entry, IDENTITY).tensor, expected, atol=1e-4, rtol=0)


def test_grey_images_are_prepared_as_their_rgb_copies_to_the_bit():
    grey = np.random.default_rng(4).integers(0, 256, (70, 90), dtype=np.uint8)
    thumbnails = np.zeros((2, features.THUMBNAIL_SIZE, features.THUMBNAIL_SIZE, 3), np.uint8)
    as_grey = features.prepare(grey, IDENTITY, thumbnails[0])
    as_rgb = features.prepare(np.repeat(grey[..., None], 3, axis=2), IDENTITY, thumbnails[1])
    torch.testing.assert_close(as_grey, as_rgb, atol=0, rtol=0)
    np.testing.assert_array_equal(thumbnails[0], thumbnails[1])
    assert features.load(item("g.png", grey), IDENTITY).tensor.equal(as_grey)


def test_sixteen_bit_images_keep_their_precision():
    gray = np.random.default_rng(2).integers(0, 65536, (40, 30), dtype=np.uint16)
    entry = item("g.png", gray)
    expected = (reference_resize(load_image(entry.data), 96) - IDENTITY.mean) / IDENTITY.std
    np.testing.assert_allclose(features.load(entry, IDENTITY).tensor.permute(1, 2, 0).numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("shape", [(300, 200), (64, 64), (20, 500), (IDENTITY.image_size,) * 2])
def test_thumbnail_is_the_rounded_filter(shape):
    """Of the image itself where it has no more pixels than the backbone's input (96 x 96 here), else of
    that input (the image filtered once, exactly), mapped back to 8-bit values: cheaper for large images."""
    entry = item("x.png", random_image(shape, 3))
    thumbnail = np.zeros((features.THUMBNAIL_SIZE,) * 2 + (3,), np.uint8)
    loaded = features.load(entry, IDENTITY, thumbnail)
    assert loaded.thumbnail is thumbnail
    image = load_image(entry.data)  # float in [0, 1]
    size = IDENTITY.image_size
    source = image if shape[0] * shape[1] <= size * size else reference_resize(image, size)
    exact = reference_resize(source, features.THUMBNAIL_SIZE) * 255
    assert np.abs(thumbnail - exact).max() <= 0.5 + 1e-3


def test_unreadable_inputs_become_errors():
    assert features.load(InputItem("a.png", "a.png", None, b"not an image"), IDENTITY).error == (
        "a.png: not an image (looks like text)")
    assert features.load(InputItem("b.png", "b.png", None, error="b.png: gone"), IDENTITY).error == "b.png: gone"


@pytest.fixture(scope="module")
def small_resnet18(random_resnet18):
    identity = dataclasses.replace(random_resnet18.identity, image_size=64)
    return FeatureExtractor(random_resnet18.net, identity, random_resnet18.pyramid_channels, random_resnet18.global_dim)


def test_batches_follow_the_input_order_with_errors_in_place(small_resnet18):
    items = [item(f"{i}.png", random_image((40 + i, 50), i)) for i in range(7)]
    items.insert(3, InputItem("bad.png", "bad.png", None, png_bytes(random_image((40, 50)))[:-60]))
    progress = []
    blocks = features.Kept.allocate(len(items), small_resnet18.global_dim)
    batches = list(features.iter_batches(small_resnet18, items, batch_size=3, kept=blocks,
                                         progress=lambda done, total: progress.append((done, total))))
    assert progress == [(0, 8), (3, 8), (6, 8), (8, 8)]  # from the start: a bar's rate counts all
    loaded = [entry for batch in batches for entry in batch.loaded]
    assert [entry.item.path for entry in loaded] == [i.path for i in items]
    assert loaded[3].error == "bad.png: truncated or corrupt image data" and loaded[3].tensor is None
    assert [len(batch.global_features) for batch in batches] == [3, 2, 2]

    # The same features, batch by batch, as the readable inputs run one at a time.
    streamed = list(features.iter_batches(small_resnet18, items, batch_size=3))
    for kept, plain in zip(batches, streamed):
        np.testing.assert_array_equal(kept.global_features, plain.global_features)
    ok = [entry for entry in loaded if entry.error is None]
    alone = features.run_backbone(small_resnet18, [features.load(ok[4].item, small_resnet18.identity)])
    np.testing.assert_allclose(batches[1].global_features[1], alone.global_features[0], rtol=1e-4, atol=1e-5)
    for row, entry in enumerate(ok):
        thumbnail = np.empty_like(entry.thumbnail)
        features.load(entry.item, small_resnet18.identity, thumbnail)
        np.testing.assert_array_equal(entry.thumbnail, thumbnail)
        np.testing.assert_array_equal(blocks.thumbnails[row], thumbnail)  # moved up past the unreadable input
    # The blocks hold the readable inputs in order: what the bank uses, without a copy.
    assert blocks.count == len(ok)
    np.testing.assert_array_equal(blocks.global_features[: blocks.count],
                                  np.concatenate([batch.global_features for batch in batches]))


def test_batch_size_must_be_positive(small_resnet18):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        next(features.iter_batches(small_resnet18, [], batch_size=0))
