"""SPADE (Cohen & Hoshen, 2020) as an estimator: ``fit`` on normal images, then ``score``.

Image level (DN2): the mean squared Euclidean distance from a test image's global feature
to those of its K nearest normal images. Pixel level: every pixel of the test image's
feature pyramid against every pixel of those K images' pyramids; the mean squared distance
to its kappa nearest is the pixel's score, upsampled and smoothed with a Gaussian.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from . import search
from .backbones import FeatureExtractor, load_extractor
from .bank import TAU_QUANTILE, BankError, NormalBank, PyramidSpill
from .features import Kept, Progress, iter_batches
from .postprocess import DEFAULT_SIGMA, to_image_map
from .sources import InputItem
from .threads import compute_lock, configure_threads

ImageScore = Literal["knn", "map-max"]
IMAGE_SCORES = ("knn", "map-max")


@dataclass
class ImageResult:
    """What SPADE says about one input; ``error`` is set (and nothing else) when it could not be read."""

    path: str
    relpath: str
    score: float | None = None
    knn_score: float | None = None
    map_max: float | None = None
    neighbours: np.ndarray | None = None  # (K,) bank indices, nearest first
    neighbour_distances: np.ndarray | None = None  # (K,) squared Euclidean distances
    anomaly_map: np.ndarray | None = None  # (H, W) float32, the image's original size
    size: tuple[int, int] | None = None  # original (height, width)
    error: str | None = None

    def anomalous(self, tau: float | None) -> bool | None:
        if self.score is None or tau is None:
            return None
        return self.score > tau


class SPADE:
    """Sub-image anomaly detection with deep pyramid correspondences.

    Parameters
    ----------
    backbone, weights:
        Passed to :func:`anomaly.backbones.load_extractor`; ``"auto"`` prefers
        wide_resnet50_2 and falls back to efficientnet_lite0. With a loaded bank,
        ``"auto"`` means the bank's own backbone.
    k:
        Number of nearest normal images (clipped to the bank size).
    kappa:
        Number of nearest normal pixels averaged per test pixel.
    image_score:
        ``"knn"`` (the paper's DN2 score) or ``"map-max"`` (maximum of the pixel map).
    sigma:
        Gaussian smoothing of the pixel map, in network-input pixels.
    precision:
        Pixel search ranking precision: ``"auto"`` (bfloat16 where the CPU has it natively,
        else float32; see search.resolve_precision), ``"fp32"`` or ``"bf16"``. Only the speed
        differs: bfloat16 ranks within bounds on its rounding, and the neighbours and distances
        returned are the exact float32 ones either way.
    calibration_images:
        How many normal images get a leave-one-out pixel map at fit time, to suggest
        the pixel threshold theta.
    """

    def __init__(
        self,
        backbone: str = "auto",
        weights: str | None = None,
        k: int = 50,
        kappa: int = 1,
        image_score: ImageScore = "knn",
        sigma: float = DEFAULT_SIGMA,
        precision: search.Precision = "auto",
        batch_size: int = 16,
        calibration_images: int = 10,
        extractor: FeatureExtractor | None = None,
    ) -> None:
        _check_int("k", k, 1)
        _check_int("kappa", kappa, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("calibration_images", calibration_images, 0)
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        if not np.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
        search.resolve_precision(precision)
        self.backbone = backbone
        self.weights = weights
        self.k = k
        self.kappa = kappa
        self.image_score = image_score
        self.sigma = float(sigma)
        self.precision = precision
        self.batch_size = batch_size
        self.calibration_images = calibration_images
        self._extractor = extractor
        self.bank_: NormalBank | None = None
        configure_threads()

    # ---- set-up -----------------------------------------------------------------
    @property
    def extractor(self) -> FeatureExtractor:
        """The backbone, loaded on first use (for a loaded bank: the bank's backbone)."""
        if self._extractor is None:
            name = self.backbone
            if name == "auto" and self.bank_ is not None:
                name = self.bank_.identity.name
            self._extractor = load_extractor(name, self.weights)
        return self._extractor

    @classmethod
    def from_bank(
        cls, bank: NormalBank, extractor: FeatureExtractor | None = None, source: str = "bank", **params
    ) -> "SPADE":
        """A fitted model around an existing bank; the backbone must be the bank's."""
        model = cls(extractor=extractor, **params)
        model.bank_ = bank
        bank.check_compatible(model.extractor.identity, source)
        return model

    @classmethod
    def load(cls, path: str, extractor: FeatureExtractor | None = None, **params) -> "SPADE":
        return cls.from_bank(NormalBank.load(path), extractor=extractor, source=str(path), **params)

    @property
    def bank(self) -> NormalBank:
        if self.bank_ is None:
            raise RuntimeError("this SPADE model is not fitted: call fit() or load a bank first")
        return self.bank_

    # ---- fit ----------------------------------------------------------------------
    def fit(
        self,
        items: Sequence[InputItem],
        progress: Progress | None = None,
        calibration_progress: Progress | None = None,
    ) -> "SPADE":
        """Extract and store the features of the normal images; unreadable ones are skipped and listed.

        ``progress`` counts images through the backbone; ``calibration_progress`` counts the
        leave-one-out pixel maps that suggest theta (often the longer part on small banks).
        """
        extractor = self.extractor
        spill = PyramidSpill()
        kept = Kept.allocate(len(items), extractor.global_dim)
        paths, sizes, skipped = [], [], []
        try:
            for batch in iter_batches(extractor, items, self.batch_size, kept=kept, progress=progress):
                skipped += [entry.error for entry in batch.loaded if entry.error is not None]
                ok = batch.ok
                if not ok:
                    continue
                spill.append(batch.pyramid)
                paths += [entry.item.path for entry in ok]
                sizes += [entry.size for entry in ok]
        except BaseException:
            spill.discard()
            raise
        if not paths:
            spill.discard()
            detail = f" ({len(skipped)} unreadable)" if skipped else ""
            raise BankError(f"no normal image could be read{detail}: a bank needs at least one")
        bank = NormalBank(
            identity=extractor.identity,
            global_features=kept.global_features[: kept.count],
            pyramid=spill.finish(),
            paths=paths,
            sizes=np.asarray(sizes, np.int32),
            thumbnails=kept.thumbnails[: kept.count],
            skipped=skipped,
        )
        del batch  # its pyramid tensors: not kept through calibration
        bank.loo_k = min(self.k, len(bank) - 1)
        bank.loo_scores = bank.leave_one_out_scores(self.k)
        bank.loo_map_max = self._calibrate_pixels(bank, calibration_progress)
        self.bank_ = bank
        return self

    def _calibrate_pixels(self, bank: NormalBank, progress: Progress | None) -> np.ndarray:
        """Maxima of leave-one-out pixel maps of evenly spaced normal images."""
        if len(bank) < 2 or self.calibration_images == 0:
            return np.zeros(0, np.float32)
        chosen = np.unique(np.linspace(0, len(bank) - 1, min(self.calibration_images, len(bank))).round().astype(int))
        maxima = []
        if progress is not None:
            progress(0, len(chosen))
        for index in chosen:
            _, neighbours = bank.nearest(bank.global_features[index : index + 1], min(self.k, len(bank) - 1) + 1)
            others = [n for n in neighbours[0] if n != index][: min(self.k, len(bank) - 1)]
            raw = self.raw_map([level[index] for level in bank.pyramid], np.asarray(others), bank)
            side = bank.identity.image_size
            maxima.append(to_image_map(raw, side, (side, side), self.sigma).max())
            if progress is not None:
                progress(len(maxima), len(chosen))
        return np.asarray(maxima, np.float32)

    # ---- score ----------------------------------------------------------------------
    def score(
        self, items: Sequence[InputItem], maps: bool = False, progress: Progress | None = None
    ) -> Iterator[ImageResult]:
        """Score inputs in order, one result each, streaming (memory does not grow with the batch).

        Pixel maps are computed when ``maps`` is true or the image score needs them.
        """
        bank = self.bank
        need_maps = maps or self.image_score == "map-max"
        for batch in iter_batches(self.extractor, items, self.batch_size, progress=progress):
            ok = batch.ok
            if ok:
                distances, neighbours = self.nearest_images(batch.global_features)
            row = 0
            for entry in batch.loaded:
                if entry.error is not None:
                    yield ImageResult(entry.item.path, entry.item.relpath, error=entry.error)
                    continue
                result = ImageResult(
                    entry.item.path,
                    entry.item.relpath,
                    knn_score=float(distances[row].mean()),
                    neighbours=neighbours[row],
                    neighbour_distances=distances[row],
                    size=entry.size,
                )
                if need_maps:
                    self._attach_map(result, [level[row] for level in batch.pyramid])
                result.score = result.map_max if self.image_score == "map-max" else result.knn_score
                row += 1
                yield result

    def nearest_images(self, global_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact squared distances (B, K) and indices (B, K) of the K nearest normal images.

        faiss finds the neighbours; their distances are recomputed directly so the score is
        exactly eq. 2 of the paper, free of the cancellation error of the dot-product form.
        """
        bank = self.bank
        _, neighbours = bank.nearest(global_features, self.k)
        diff = bank.global_features[neighbours] - global_features[:, None, :]
        distances = np.einsum("bkd,bkd->bk", diff, diff)
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(neighbours, order, 1)

    def raw_map(
        self, levels: Sequence[torch.Tensor | np.ndarray], neighbours: np.ndarray, bank: NormalBank | None = None
    ) -> torch.Tensor:
        """(h, w) mean squared distance of each pixel of an image's pyramid ``levels`` ((C_l, h_l, w_l),
        finest first) to its kappa nearest pixels among all pixels of the ``neighbours`` normal images,
        every level compared as if upsampled to the finest grid and concatenated (see search.pyramid_knn)."""
        bank = bank or self.bank
        height, width = levels[0].shape[-2:]
        with compute_lock:
            nearest = search.pyramid_knn(levels, bank.pyramid, neighbours, self.kappa, self.precision)
        return nearest.mean(dim=1).reshape(height, width)

    def _attach_map(self, result: ImageResult, levels: list[torch.Tensor]) -> None:
        raw = self.raw_map(levels, result.neighbours)
        result.anomaly_map = to_image_map(raw, self.bank.identity.image_size, result.size, self.sigma)
        result.map_max = float(result.anomaly_map.max())

    def explain(self, item: InputItem) -> ImageResult:
        """Score one input with its pixel map (for inspecting a single image)."""
        return next(self.score([item], maps=True))

    # ---- thresholds -------------------------------------------------------------------
    def suggested_tau(self) -> float | None:
        """Image threshold suggested by the bank for this model's image score."""
        if self.image_score == "map-max":
            return self.bank.suggested_theta()
        scores = self.bank.loo_scores_for(self.k)
        return float(np.quantile(scores, TAU_QUANTILE)) if len(scores) else None

    def suggested_theta(self) -> float | None:
        """Pixel threshold suggested by the bank (maxima of leave-one-out normal maps)."""
        return self.bank.suggested_theta()


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
