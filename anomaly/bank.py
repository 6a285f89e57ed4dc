"""The normal bank: everything SPADE keeps about the normal images, computed once.

Global features (float32) serve the image-level kNN; pyramid features are kept at each
level's native resolution in float16 (upsampled only for the K neighbours of a query),
memory-mapped from disk so a bank can be larger than memory. Thumbnails let the
neighbours be shown without the original files. A bank also carries the leave-one-out
statistics that suggest thresholds, and the identity of the backbone that made it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
import torch

from . import search, tensorfile
from .backbones import BackboneIdentity

FORMAT = "spade-bank"
VERSION = 1
TAU_QUANTILE = 0.99
"""Suggested thresholds flag about 1% of the normal images themselves (leave-one-out)."""


class BankError(ValueError):
    """A bank file cannot be used; the message names the file and the reason in one line."""


@dataclass(eq=False)
class NormalBank:
    identity: BackboneIdentity
    global_features: np.ndarray  # (N, D) float32
    pyramid: list[np.ndarray]  # per level (N, C_l, H_l, W_l) float16, finest first
    paths: list[str]
    sizes: np.ndarray  # (N, 2) int32, original (height, width)
    thumbnails: np.ndarray  # (N, T, T, 3) uint8
    skipped: list[str] = field(default_factory=list)  # inputs that could not be read at fit time
    loo_k: int = 0
    loo_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,)
    loo_map_max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # sampled normals

    def __post_init__(self) -> None:
        n = len(self.global_features)
        if n == 0:
            raise BankError("the normal bank is empty: no normal image could be read")
        lengths = {len(self.paths), len(self.sizes), len(self.thumbnails), *(len(level) for level in self.pyramid)}
        if lengths != {n}:
            raise BankError(f"inconsistent bank: {n} global features but parts of lengths {sorted(lengths)}")
        # Built eagerly, once: the bank is then read-only and safe to share between threads.
        self.index: faiss.IndexFlatL2 = search.build_index(self.global_features)

    def __len__(self) -> int:
        return len(self.global_features)

    # ---- search -------------------------------------------------------------
    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances, indices) of the k nearest normal images, k clipped to the bank size."""
        k = max(1, min(k, len(self)))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    # ---- thresholds -----------------------------------------------------------
    def leave_one_out_scores(self, k: int) -> np.ndarray:
        """Each normal image's kNN score against the others (its own match removed)."""
        if len(self) < 2:
            return np.zeros(0, np.float32)
        k = min(k, len(self) - 1)
        distances, indices = self.nearest(self.global_features, k + 1)
        not_self = indices != np.arange(len(self))[:, None]
        # Exact duplicates can tie with the image itself; dropping the self match by index
        # (or the farthest hit when self was not returned) leaves exactly k others.
        not_self[not_self.all(axis=1), -1] = False
        kept = distances[not_self].reshape(len(self), k)
        return kept.mean(axis=1).astype(np.float32)

    def loo_scores_for(self, k: int) -> np.ndarray:
        """Leave-one-out scores for this K: the stored ones when K matches the fit's, else computed."""
        if min(k, len(self) - 1) == self.loo_k:
            return self.loo_scores
        return self.leave_one_out_scores(k)

    def suggested_tau(self) -> float | None:
        """The TAU_QUANTILE quantile of the leave-one-out kNN scores (None with a single image)."""
        if len(self.loo_scores) == 0:
            return None
        return float(np.quantile(self.loo_scores, TAU_QUANTILE))

    def suggested_theta(self) -> float | None:
        """The TAU_QUANTILE quantile of the maxima of sampled leave-one-out pixel maps."""
        if len(self.loo_map_max) == 0:
            return None
        return float(np.quantile(self.loo_map_max, TAU_QUANTILE))

    # ---- identity ----------------------------------------------------------------
    @cached_property
    def fingerprint(self) -> str:
        """A short content hash: equal banks share caches, different ones never do."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.identity.to_dict(), sort_keys=True).encode())
        digest.update(json.dumps(self.paths).encode())
        digest.update(np.ascontiguousarray(self.global_features).tobytes())
        return digest.hexdigest()[:16]

    def nbytes(self) -> int:
        """Bytes of features and thumbnails (on disk, or mapped when loaded)."""
        parts = [self.global_features, self.thumbnails, *self.pyramid]
        return int(sum(part.nbytes for part in parts))

    def check_compatible(self, identity: BackboneIdentity, source: str = "bank") -> None:
        if not self.identity.compatible_with(identity):
            raise BankError(
                f"{source}: built with {self.identity.name} ({self.identity.weights}, "
                f"{self.identity.image_size} px), but {identity.name} ({identity.weights}, "
                f"{identity.image_size} px) was requested; rebuild the bank or use its backbone"
            )

    # ---- persistence -------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the bank to ``path`` atomically (no pickle; safetensors layout)."""
        arrays = {
            "global": np.ascontiguousarray(self.global_features, np.float32),
            **{f"pyramid.{i}": level for i, level in enumerate(self.pyramid)},
            "sizes": np.asarray(self.sizes, np.int32),
            "thumbnails": np.asarray(self.thumbnails, np.uint8),
            "loo_scores": np.asarray(self.loo_scores, np.float32),
            "loo_map_max": np.asarray(self.loo_map_max, np.float32),
        }
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "identity": json.dumps(self.identity.to_dict()),
            "paths": json.dumps(self.paths),
            "skipped": json.dumps(self.skipped),
            "loo_k": str(self.loo_k),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tensorfile.write(path, arrays, metadata)

    @classmethod
    def load(cls, path: str | Path, expect: BackboneIdentity | None = None) -> "NormalBank":
        """Read a bank saved by :meth:`save`; with ``expect``, refuse one from another backbone."""
        try:
            arrays, metadata = tensorfile.read(path)
        except tensorfile.TensorFileError as exc:
            raise BankError(str(exc)) from None
        if metadata.get("format") != FORMAT:
            raise BankError(f"{path}: not a bank file (no '{FORMAT}' marker)")
        if metadata.get("version") != str(VERSION):
            raise BankError(f"{path}: bank format version {metadata.get('version')} is not supported (need {VERSION})")
        try:
            levels = sorted(int(name.split(".")[1]) for name in arrays if name.startswith("pyramid."))
            bank = cls(
                identity=BackboneIdentity.from_dict(json.loads(metadata["identity"])),
                global_features=np.asarray(arrays["global"]),
                pyramid=[arrays[f"pyramid.{i}"] for i in levels],
                paths=[str(p) for p in json.loads(metadata["paths"])],
                sizes=np.asarray(arrays["sizes"]),
                thumbnails=arrays["thumbnails"],
                skipped=[str(s) for s in json.loads(metadata.get("skipped", "[]"))],
                loo_k=int(metadata.get("loo_k", "0")),
                loo_scores=np.asarray(arrays["loo_scores"]),
                loo_map_max=np.asarray(arrays["loo_map_max"]),
            )
        except BankError as exc:
            raise BankError(f"{path}: {exc}") from None
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise BankError(f"{path}: not a valid bank ({type(exc).__name__}: {exc})") from None
        if expect is not None:
            bank.check_compatible(expect, str(path))
        return bank


class PyramidSpill:
    """Collects float16 pyramid levels batch by batch in temporary files, not in memory.

    :meth:`finish` returns read-only memory maps and removes the files' names at once:
    on POSIX systems the data stays readable until the last map is dropped, so nothing
    is left behind whatever happens to the process.
    """

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="spade-bank-"))
        self._files: list = []
        self._shapes: list[tuple[int, ...]] = []
        self._count = 0

    def append(self, levels: list[torch.Tensor]) -> None:
        if not self._files:
            self._files = [open(self._dir / f"level{i}.f16", "wb") for i in range(len(levels))]
            self._shapes = [tuple(level.shape[1:]) for level in levels]
        for f, level in zip(self._files, levels):
            f.write(level.to(torch.float16).contiguous().numpy())  # the buffer itself: no bytes copy
        self._count += levels[0].shape[0] if levels else 0

    def finish(self) -> list[np.ndarray]:
        for f in self._files:
            f.close()
        try:
            return [
                np.memmap(self._dir / f"level{i}.f16", dtype=np.float16, mode="r", shape=(self._count, *shape))
                for i, shape in enumerate(self._shapes)
            ]
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def discard(self) -> None:
        for f in self._files:
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)
