"""From input files to backbone features, in batches, with decoding overlapped.

Images are decoded and resized on a background thread while the backbone runs on
the previous batch, so the CPU cores are not idle waiting for Pillow. Unreadable
inputs do not stop a batch: they come back as :class:`Loaded` entries with an
``error`` and no tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import BackboneIdentity, FeatureExtractor
from .imageio import ImageLoadError, load_image
from .sources import InputItem

THUMBNAIL_SIZE = 128

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each batch."""


@dataclass
class Loaded:
    """One input after decoding: the network tensor, or the reason it could not be read."""

    item: InputItem
    tensor: torch.Tensor | None = None  # (3, S, S), normalised
    size: tuple[int, int] | None = None  # original (height, width)
    thumbnail: np.ndarray | None = None  # (T, T, 3) uint8
    error: str | None = None


@dataclass
class Batch:
    """A batch of inputs and the features of those that could be read."""

    loaded: list[Loaded]
    global_features: np.ndarray  # (B_ok, D) float32, rows follow ``ok``
    pyramid: list[torch.Tensor]  # per level (B_ok, C_l, H_l, W_l) float32

    @property
    def ok(self) -> list[Loaded]:
        return [entry for entry in self.loaded if entry.error is None]


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (B, C, H, W) tensor; antialiased when shrinking."""
    shrinking = size[0] < image.shape[-2] or size[1] < image.shape[-1]
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def prepare(image: np.ndarray, identity: BackboneIdentity) -> torch.Tensor:
    """A float RGB (H, W, 3) image in [0, 1] as the backbone's normalised (3, S, S) input.

    The whole image is resized (no centre crop) so the anomaly map covers every pixel.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    side = identity.image_size
    tensor = resize(tensor, (side, side))[0]
    mean = torch.tensor(identity.mean).view(3, 1, 1)
    std = torch.tensor(identity.std).view(3, 1, 1)
    return (tensor - mean) / std


def make_thumbnail(image: np.ndarray, side: int = THUMBNAIL_SIZE) -> np.ndarray:
    """A small square uint8 copy (aspect ratio is restored from the stored size when shown)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    small = resize(tensor, (side, side))[0].permute(1, 2, 0).numpy()
    return np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8)


def load(item: InputItem, identity: BackboneIdentity, thumbnail: bool = False) -> Loaded:
    """Decode and prepare one input; any failure becomes a one-line error."""
    if item.error is not None:
        return Loaded(item, error=item.error)
    try:
        image = load_image(item.read_bytes(), item.path)
    except ImageLoadError as exc:
        return Loaded(item, error=str(exc))
    except OSError as exc:
        return Loaded(item, error=f"{item.path}: cannot read file ({exc.strerror or exc})")
    return Loaded(
        item,
        tensor=prepare(image, identity),
        size=(image.shape[0], image.shape[1]),
        thumbnail=make_thumbnail(image) if thumbnail else None,
    )


def iter_batches(
    extractor: FeatureExtractor,
    items: Sequence[InputItem],
    batch_size: int = 16,
    thumbnails: bool = False,
    progress: Progress | None = None,
) -> Iterator[Batch]:
    """Yield feature batches in input order, decoding the next batch while this one runs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    identity = extractor.identity
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]

    def decode(chunk: Sequence[InputItem]) -> list[Loaded]:
        return [load(item, identity, thumbnails) for item in chunk]

    done = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, chunks[0]) if chunks else None
        for index in range(len(chunks)):
            loaded = pending.result()
            pending = pool.submit(decode, chunks[index + 1]) if index + 1 < len(chunks) else None
            yield run_backbone(extractor, loaded)
            done += len(loaded)
            if progress is not None:
                progress(done, len(items))


def run_backbone(extractor: FeatureExtractor, loaded: list[Loaded]) -> Batch:
    """Features of the readable entries of ``loaded``."""
    tensors = [entry.tensor for entry in loaded if entry.error is None]
    if not tensors:
        return Batch(loaded, np.zeros((0, extractor.global_dim), np.float32), [])
    with torch.inference_mode():
        x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
        global_features, pyramid = extractor(x)
    return Batch(
        loaded,
        global_features.float().contiguous().numpy(),
        [level.float().contiguous() for level in pyramid],
    )


def stack_pyramid(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the finest one (bilinear) and concatenate along channels.

    ``levels``: (B, C_l, H_l, W_l) tensors, finest first. Returns (B, sum C_l, H_0, W_0).
    """
    finest = levels[0].shape[-2:]
    upsampled = [levels[0].float()] + [
        F.interpolate(level.float(), size=finest, mode="bilinear", align_corners=False) for level in levels[1:]
    ]
    return torch.cat(upsampled, dim=1)
