"""From input files to backbone features, in batches.

Each batch is decoded on as many threads as the backbone uses, then run through it,
rather than decoded on one thread beside it: the backbone's thread team waits at every
layer for its slowest thread, so a decode thread taking a core stalls the whole team,
and a single decode thread cannot keep up with more cores. Decode threads use only
Pillow, numpy and a serial compiled loop (:mod:`anomaly.resample`), which release the GIL
and bring no thread pool of their own (torch would start one per thread). Unreadable inputs
do not stop a batch: they come back as :class:`Loaded` entries with an ``error`` and no tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import png
from .backbones import BackboneIdentity, FeatureExtractor
from .imageio import ImageLoadError, load_pixels
from .resample import resize_rgb
from .sources import InputItem

THUMBNAIL_SIZE = 128

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` once as the work starts (``done`` 0: a bar's clock starts there)
and after each batch."""


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


def prepare(image: np.ndarray, identity: BackboneIdentity, thumbnail: np.ndarray | None = None) -> torch.Tensor:
    """A decoded RGB or grey image (`load_pixels`: uint8, or float in [0, 1]) as the backbone's normalised
    (3, S, S) input, with its thumbnail written into ``thumbnail`` ((T, T, 3) uint8) when one is given.

    The whole image is resized (no centre crop) so the anomaly map covers every pixel, with the filter
    of `resize` (bilinear, antialiased when shrinking), which `resize_rgb` computes in double precision
    straight from the 8-bit values: within 1e-7 of exact, where torch's float32 kernel is within 1e-5.
    """
    unit = 255.0 if image.dtype == np.uint8 else 1.0
    mean, std = np.asarray(identity.mean), np.asarray(identity.std)
    size = (identity.image_size,) * 2
    tensor = resize_rgb(image, size, 1.0 / (unit * std), -mean / std)
    if thumbnail is not None:  # square; the aspect ratio is restored from the stored size when shown
        # Resized from whichever has fewer pixels, the image or the backbone's input: from a 2,448 px image
        # itself the thumbnail cost 6 ms, about as much as the input (a 1,024 px one's 1.3 ms of 2.9).
        if image.shape[0] * image.shape[1] <= size[0] * size[1]:
            small = resize_rgb(image, thumbnail.shape[:2], np.full(3, 255.0 / unit))
        else:
            small = resize_rgb(tensor.transpose(1, 2, 0), thumbnail.shape[:2], 255.0 * std, 255.0 * mean)
        thumbnail[...] = np.clip(np.rint(small), 0, 255).transpose(1, 2, 0)
    return torch.from_numpy(tensor)


def warm_up() -> None:
    """Compile the decoding and resizing loops now instead of in the first batch: with an empty numba
    cache that takes a few seconds, which an app can spend in the background."""
    png.warm_up()
    # grey and RGB bytes, and the backbone's input (float32) that large images' thumbnails are resized from
    for image in (np.zeros((2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.float32)):
        resize_rgb(image, (1, 1))


def load(item: InputItem, identity: BackboneIdentity, thumbnail: np.ndarray | None = None) -> Loaded:
    """Decode and prepare one input, with a thumbnail written into ``thumbnail`` when one is given;
    any failure becomes a one-line error."""
    if item.error is not None:
        return Loaded(item, error=item.error)
    try:
        image = load_pixels(item.read_bytes(), item.path, keep_grey=True)
    except ImageLoadError as exc:
        return Loaded(item, error=str(exc))
    except OSError as exc:
        return Loaded(item, error=f"{item.path}: cannot read file ({exc.strerror or exc})")
    return Loaded(item, tensor=prepare(image, identity, thumbnail), size=image.shape[:2], thumbnail=thumbnail)


@dataclass
class Kept:
    """What a bank keeps of every readable input, in blocks allocated once for all inputs: thousands
    of small arrays kept while each batch's large temporaries come and go fragment the heap (glibc
    held ~0.4 MB more per image). Rows ``:count`` follow the readable inputs in order, so the bank
    uses the blocks as they are, without a copy."""

    thumbnails: np.ndarray  # (N, T, T, 3) uint8
    global_features: np.ndarray  # (N, D) float32
    count: int = 0

    @classmethod
    def allocate(cls, inputs: int, global_dim: int) -> "Kept":
        return cls(np.empty((inputs, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8),
                   np.empty((inputs, global_dim), np.float32))


def iter_batches(
    extractor: FeatureExtractor,
    items: Sequence[InputItem],
    batch_size: int = 16,
    kept: Kept | None = None,
    progress: Progress | None = None,
) -> Iterator[Batch]:
    """Yield feature batches in input order, each decoded on as many threads as the backbone uses.

    With ``kept`` (allocated for ``len(items)`` inputs; building a bank), each readable input's
    thumbnail and global features are written into its next rows, and the batch's arrays are views
    of them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    identity = extractor.identity

    def decode(index: int) -> Loaded:
        # Written at the input's own index, which no row still to be filled lies beyond.
        return load(items[index], identity, None if kept is None else kept.thumbnails[index])

    if progress is not None:
        progress(0, len(items))
    with ThreadPoolExecutor(max_workers=torch.get_num_threads(), thread_name_prefix="decode") as pool:
        for start in range(0, len(items), batch_size):
            loaded = list(pool.map(decode, range(start, min(start + batch_size, len(items)))))
            if kept is None:
                yield run_backbone(extractor, loaded)
            else:
                rows = kept.count
                for index, entry in enumerate(loaded, start):
                    if entry.error is None:
                        if kept.count != index:  # an unreadable input came before: move up into its row
                            kept.thumbnails[kept.count] = kept.thumbnails[index]
                        entry.thumbnail = kept.thumbnails[kept.count]
                        kept.count += 1
                yield run_backbone(extractor, loaded, kept.global_features[rows : kept.count])
            if progress is not None:
                progress(start + len(loaded), len(items))


def run_backbone(extractor: FeatureExtractor, loaded: list[Loaded], global_out: np.ndarray | None = None) -> Batch:
    """Features of the readable entries of ``loaded``; the global ones written into ``global_out``
    ((readable, D) float32) when it is given."""
    tensors = [entry.tensor for entry in loaded if entry.error is None]
    if not tensors:
        return Batch(loaded, np.zeros((0, extractor.global_dim), np.float32), [])
    with torch.inference_mode():
        x = torch.stack(tensors).contiguous(memory_format=torch.channels_last)
        global_features, pyramid = extractor(x)
    global_features = global_features.float().contiguous().numpy()
    if global_out is not None:
        global_out[...] = global_features
        global_features = global_out
    return Batch(loaded, global_features, [level.float().contiguous() for level in pyramid])


def stack_pyramid(levels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Upsample every level to the finest one (bilinear) and concatenate along channels.

    ``levels``: (B, C_l, H_l, W_l) tensors, finest first. Returns (B, sum C_l, H_0, W_0).
    """
    finest = levels[0].shape[-2:]
    upsampled = [levels[0].float()] + [
        F.interpolate(level.float(), size=finest, mode="bilinear", align_corners=False) for level in levels[1:]
    ]
    return torch.cat(upsampled, dim=1)
