"""Tables of a scored batch: the results table, the confusion counts at tau, CSV export."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..metrics import image_roc_auc
from .session import Batch

SCORE_COLUMN = "score (squared distance)"


def results_table(batch: Batch, tau: float) -> pd.DataFrame:
    """One row per input, highest score first (unreadable last): file, score, verdict at tau, label, error."""
    rows = []
    for index, (result, label, defect) in enumerate(zip(batch.results, batch.labels, batch.defects)):
        rows.append({
            "#": index,
            "file": result.relpath,
            SCORE_COLUMN: result.score,
            "anomalous": result.anomalous(tau),
            "label": None if label is None else ("good" if label == 0 else f"defect: {defect}"),
            "error": result.error or "",
        })
    table = pd.DataFrame(rows, columns=["#", "file", SCORE_COLUMN, "anomalous", "label", "error"])
    if not batch.labelled:
        table = table.drop(columns="label")
    return table.sort_values(SCORE_COLUMN, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Confusion:
    true_positives: int  # defect, flagged
    false_positives: int  # good, flagged
    true_negatives: int
    false_negatives: int
    auroc: float | None  # None unless both classes are present


def confusion(batch: Batch, tau: float) -> Confusion | None:
    """Counts at tau over labelled readable images (None when nothing is labelled)."""
    chosen = [i for i in batch.valid if batch.labels[i] is not None]
    if not chosen:
        return None
    labels = np.array([batch.labels[i] for i in chosen])
    scores = np.array([batch.results[i].score for i in chosen], np.float64)
    flagged = scores > tau
    auroc = image_roc_auc(labels, scores) if len(set(labels.tolist())) == 2 else None
    return Confusion(
        true_positives=int(np.sum(flagged & (labels == 1))),
        false_positives=int(np.sum(flagged & (labels == 0))),
        true_negatives=int(np.sum(~flagged & (labels == 0))),
        false_negatives=int(np.sum(~flagged & (labels == 1))),
        auroc=auroc,
    )


def csv_bytes(table: pd.DataFrame) -> bytes:
    """CSV for spreadsheets; text cells that a spreadsheet would run as a formula are quoted with '."""
    def defuse(value):
        if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
            return "'" + value
        return value

    return table.map(defuse).to_csv(index=False).encode("utf-8")
