"""Nearest-neighbour search: the only place that computes distances.

Two searches serve SPADE:

* image level: a few query vectors against the bank's global features, an exact
  faiss ``IndexFlatL2`` built once per bank and shared (faiss indexes are safe to
  search from several threads; nothing here mutates one after it is built);
* pixel level: thousands of query pixels against every pixel of K neighbour
  images. :func:`pixel_knn` streams the gallery in blocks (never a full distance
  matrix), ranks candidates with one matrix product per tile, optionally in
  bfloat16, and then recomputes the chosen candidates' distances exactly in
  float32 so the scores it returns are true squared Euclidean distances.

All distances are *squared* Euclidean, as in the paper's equations.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Literal

import faiss
import numpy as np
import torch

Precision = Literal["auto", "fp32", "bf16"]

# Tile sizes: the (query x gallery) block of approximate distances should stay in
# the CPU caches; 1024 x 2048 float32 is 8 MiB. Measured in bench/.
QUERY_TILE = 1024
GALLERY_TILE = 2048
# Extra candidates kept per tile on the bfloat16 path before the exact re-rank.
BF16_MARGIN = 3


def knn(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (squared L2, ascending) with faiss, in batches."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    k = min(k, len(gallery))
    return faiss.knn(queries, gallery, k)


def build_index(vectors: np.ndarray) -> faiss.IndexFlatL2:
    """An exact L2 index over ``vectors`` (N, D), built once and reused for every query."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatL2(vectors.shape[1])
    index.add(vectors)
    return index


@lru_cache(maxsize=1)
def bf16_supported() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: Precision) -> Literal["fp32", "bf16"]:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


def pixel_knn(
    queries: torch.Tensor,
    gallery_blocks: Iterable[torch.Tensor],
    kappa: int = 1,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Squared distances (P, kappa), ascending, from each query row to its kappa nearest gallery rows.

    ``queries`` is (P, C) float32; ``gallery_blocks`` yields (G_i, C) float32 blocks whose
    union is the gallery, so a caller can build the gallery lazily and only one block is
    alive at a time. Candidates are ranked by ``|g|^2 - 2 q.g`` (the query's norm does not
    change the order); their distances are then recomputed as ``sum((q - g)^2)`` in float32.
    """
    if kappa < 1:
        raise ValueError(f"kappa must be at least 1, got {kappa}")
    mode = resolve_precision(precision)
    queries = queries.float().contiguous()
    num_queries = queries.shape[0]
    ranked_queries = queries.bfloat16() if mode == "bf16" else queries
    margin = BF16_MARGIN if mode == "bf16" else 0
    best = torch.full((num_queries, kappa), float("inf"))
    for block in gallery_blocks:
        block = block.float().contiguous()
        ranked_block = block.bfloat16() if mode == "bf16" else block
        for start in range(0, block.shape[0], GALLERY_TILE):
            tile = block[start : start + GALLERY_TILE]
            ranked_tile = ranked_block[start : start + GALLERY_TILE]
            tile_norms = (tile * tile).sum(1)
            keep = min(kappa + margin, tile.shape[0])
            for q0 in range(0, num_queries, QUERY_TILE):
                rows = slice(q0, q0 + QUERY_TILE)
                products = ranked_queries[rows] @ ranked_tile.T
                ranking = tile_norms - 2.0 * products.float()
                if keep == 1:
                    candidates = ranking.argmin(1, keepdim=True)
                else:
                    candidates = ranking.topk(keep, dim=1, largest=False).indices
                exact = _exact_sq_distances(queries[rows], tile, candidates)
                merged = torch.cat([best[rows], exact], dim=1)
                best[rows] = merged.topk(kappa, dim=1, largest=False).values
    return best.sort(dim=1).values


def _exact_sq_distances(queries: torch.Tensor, tile: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """sum((q - g)^2) for each query row and each of its candidate gallery rows."""
    gathered = tile[candidates]  # (P, c, C)
    diff = gathered - queries[:, None, :]
    return (diff * diff).sum(-1)
