"""Fit on a category's normal images, score its test set, and measure how well SPADE did.

Shared by ``python -m anomaly evaluate`` and the dashboard's Evaluate page.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .datasets import MVTecCategory, load_mask
from .metrics import image_roc_auc, pixel_roc_auc, pro_score
from .spade import SPADE, ImageResult

PRO_THRESHOLDS = 2000
"""Enough thresholds that PRO is within about 0.0003 of its exact value (see metrics.pro_score)."""

Stage = Callable[[str, int, int], None]
"""Progress with a stage name: ``stage(name, done, total)``."""


@dataclass
class Scored:
    """One test image's result with its ground truth."""

    result: ImageResult
    label: int
    defect: str
    mask: np.ndarray | None  # bool (H, W), None when the category has no masks for it


@dataclass
class Report:
    category: str
    backbone: str
    weights: str
    k: int
    kappa: int
    train_images: int
    test_images: int
    image_auroc_knn: float | None
    image_auroc_map_max: float | None
    pixel_auroc: float | None
    pro: float | None
    per_defect: dict[str, dict[str, float | int | None]]
    seconds: dict[str, float]
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(
    category: MVTecCategory, model: SPADE, stage: Stage | None = None
) -> tuple[Report, list[Scored]]:
    """Fit ``model`` on ``category.train``, score ``category.test`` with pixel maps, compute metrics."""
    def progress(name: str):
        return None if stage is None else (lambda done, total: stage(name, done, total))

    started = time.perf_counter()
    model.fit(category.train, progress=progress("fit"), calibration_progress=progress("calibrate"))
    fitted = time.perf_counter()
    items = [entry.item for entry in category.test]
    scored: list[Scored] = []
    errors = list(model.bank.skipped)
    for entry, result in zip(category.test, model.score(items, maps=True, progress=progress("score"))):
        if result.error is not None:
            errors.append(result.error)
            continue
        mask = load_mask(entry.mask, result.size) if entry.mask is not None or entry.label == 0 else None
        scored.append(Scored(result, entry.label, entry.defect, mask))
    done = time.perf_counter()
    identity = model.bank.identity
    report = Report(
        category=category.name,
        backbone=identity.name,
        weights=identity.weights,
        k=model.k,
        kappa=model.kappa,
        train_images=len(model.bank),
        test_images=len(scored),
        **overall_metrics(scored),
        per_defect=per_defect_metrics(scored),
        seconds={
            "fit": round(fitted - started, 2),
            "score_with_maps": round(done - fitted, 2),
            "per_test_image": round((done - fitted) / max(1, len(items)), 3),
        },
        errors=errors,
    )
    return report, scored


def overall_metrics(scored: list[Scored]) -> dict[str, float | None]:
    labels = np.array([s.label for s in scored])
    return {
        "image_auroc_knn": _auroc(labels, [s.result.knn_score for s in scored]),
        "image_auroc_map_max": _auroc(labels, [s.result.map_max for s in scored]),
        **_pixel_metrics(scored),
    }


def per_defect_metrics(scored: list[Scored]) -> dict[str, dict[str, float | int | None]]:
    """Each defect type against the good test images."""
    good = [s for s in scored if s.label == 0]
    breakdown: dict[str, dict[str, float | int | None]] = {}
    for defect in sorted({s.defect for s in scored if s.label == 1}):
        subset = good + [s for s in scored if s.defect == defect and s.label == 1]
        metrics = overall_metrics(subset)
        breakdown[defect] = {"images": len(subset) - len(good), **metrics}
    return breakdown


def _auroc(labels: np.ndarray, scores: list[float | None]) -> float | None:
    if len(set(labels.tolist())) < 2 or any(s is None for s in scores):
        return None
    return round(float(image_roc_auc(labels, np.asarray(scores, np.float64))), 4)


def _pixel_metrics(scored: list[Scored]) -> dict[str, float | None]:
    """Pixel ROC AUC and PRO over images that have masks (None when no anomalous mask exists)."""
    with_masks = [s for s in scored if s.mask is not None and s.result.anomaly_map is not None]
    if not any(s.mask.any() for s in with_masks) or all(s.mask.all() for s in with_masks):
        return {"pixel_auroc": None, "pro": None}
    masks = [s.mask for s in with_masks]
    maps = [s.result.anomaly_map for s in with_masks]
    return {
        "pixel_auroc": round(float(pixel_roc_auc(masks, maps)), 4),
        "pro": round(float(pro_score(masks, maps, num_thresholds=PRO_THRESHOLDS)), 4),
    }
