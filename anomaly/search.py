"""Nearest-neighbour search: the only place that computes distances.

Two searches serve SPADE:

* image level: a few query vectors against the bank's global features, an exact
  faiss ``IndexFlatL2`` built once per bank and shared (faiss indexes are safe to
  search from several threads; nothing here mutates one after it is built);
* pixel level: every pixel of a query image against every pixel of its K nearest
  normal images, compared as :func:`anomaly.features.stack_pyramid` stacks them; this
  is where SPADE spends its time. :func:`pyramid_knn` does it without building either
  stack:

  - Squared distances come straight out of matrix products: the operands carry their
    squared norms as extra columns (hi/lo halves), so an entry is |q|^2 + |g|^2 - 2 q.g,
    with both sides first centred on the query's mean pixel. A bfloat16 product then
    rounds the distance itself, not a large dot product it is the difference of.
  - Thick coarse levels (wide_resnet50_2's 512 and 1,024 channels at 28 x 28 and
    14 x 14, efficientnet_lite0's 112 at 14 x 14) are multiplied at native resolution on
    both sides, in float32. An upsampled pixel is a bilinear mix of four native ones, so
    its squared distances are the same mix of theirs less the mix's own spread
    (:func:`anomaly.fused.mix_spread`); interpolating native products costs a small fraction of
    multiplying upsampled pixels (1/256 at level 3). Thin levels are upsampled and
    multiplied on the finest grid.
  - The finest-grid product, the interpolated native products and the spreads meet in
    one compiled pass (:mod:`anomaly.fused`) that keeps only the minima of chunks (runs of
    8 pixels along a gallery row);
    the ranking distances are never written out in full. With the nearest images searched
    first, most chunks of the later ones are ruled out by a single comparison, and only
    the entries of the chunks that pass are formed again.
  - Once the nearest images have been searched, few entries come near any query's bound, and
    most of the finest-grid product only proves that. A tile then multiplies a lower bound instead:
    the finest-grid channels of both sides projected on the query's 28 leading principal
    directions, a product of 32 columns instead of 68 (efficientnet_lite0) or 260
    (wide_resnet50_2). The coarse levels stay exact, so the bound stays close: about three
    times as many (chunk, query) pairs pass it as pass the exact distances, and the screen
    forms those entries' finest-grid part again, exactly. On a CPU with AVX512-BF16 (bfloat16)
    or AVX2 (float32) that product is never written out: writing and reading its 2.5 million
    entries took longer than multiplying 32 columns, so the minima loop forms it tile by
    tile in registers (:mod:`anomaly.tiledot`, :class:`anomaly.fused.TiledProduct`), with
    AMX's tile unit where there is one.
  - Only the final candidates' distances are recomputed, as ``sum((q - g)^2)`` in
    float32 from the bank's values: returned scores are exact distances to real gallery
    pixels. Each ranking distance brackets the exact one within a bound on its rounding
    (:meth:`_Plan.tolerance`: float32's, and bfloat16's on top), and every pixel whose
    bracket reaches below the kappa-th best upper end is kept. So float32 ranking, whose
    |q|^2 + |g|^2 - 2 q.g rounds at the scale of the norms, and bfloat16 ranking, which
    rounds a distance by up to a few percent of the pixels' norms, both return the nearest
    pixels' exact distances. Entries that pass a bfloat16 block are formed again from the
    float32 rows before they are bracketed, so they carry float32's bound only: bfloat16's,
    far wider than the gaps between near pixels of uniform backgrounds, kept 48 candidates per
    query on bottle instead of 1.2. The bounds then cost a few more candidates per query.

All distances are *squared* Euclidean, as in the paper's equations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from anomaly import fused, tiledot

Precision = Literal["auto", "fp32", "bf16"]

# Query pixels per pass, at most, by ranking precision: a (gallery image x query tile) product written out,
# about 10 MB at 224 px in either, then stays in the L3 cache for the compiled pass that reduces it. Each pass
# has fixed costs (Python, starting the thread team, each gallery row's setup), and most passes are bounded,
# never written out: in bfloat16, 1,568 queries per pass instead of 784 took 0.314-0.317 s per image to
# 0.280-0.281 on magnetic_tile, 0.301-0.324 to 0.275-0.280 on bottle (efficientnet_lite0) and 0.790-0.793 to
# 0.774-0.779 with wide_resnet50_2 (2-core Xeon, in turns, the same distances).
QUERY_TILE = {"bf16": 2048, "fp32": 1024}
# Gallery pixels per chunk (a run along one row of the grid) in the two-stage search for the
# smallest distances.
CHUNK = 8
# Rows of a flat gallery handled as one "image" (no interpolation there).
GALLERY_TILE = 4096
# At most this many candidates per query (or kappa, where it is larger) go to the exact recompute. Only
# exact ties (a uniform image, duplicated normals) come near it; the cap then keeps the best-ranked ones.
MAX_CANDIDATES = 256
# Unit roundoff 2^-p of bfloat16 (p = 8 significant bits) and float32 (p = 24): rounding to nearest moves a
# value by at most this share of it (bfloat16(8.03) = 8, off by 0.0037 of it).
BF16_ROUNDOFF = 2.0**-8
FP32_ROUNDOFF = 2.0**-24
# Coarse levels with at least this many channels are multiplied at native resolution (see
# _Plan); for thinner ones, upsampling and multiplying on the finest grid is cheaper. The
# break-even follows the speed of the finest-grid product (bfloat16 is 2-4x faster):
# efficientnet_lite0's 112 channels at 14 x 14 measured faster native, its 40 at 28 x 28 not.
FACTOR_MIN_CHANNELS = {"bf16": 96, "fp32": 64}
# Once a query tile's entries are rarely near its bounds, its finest-grid product is replaced by a
# lower bound (see _Plan): the channels projected on this many principal directions of the query's
# own pixels, a product of BOUND_RANK + 4 columns instead of one per channel.
BOUND_RANK = 28
# ... used only where the finest grid has at least this many channels (twice the columns or more),
BOUND_MIN_CHANNELS = 2 * (BOUND_RANK + 4) - 4
# ... where those directions hold at least this share of the query pixels' spread (efficientnet_lite0
# on magnetic_tile: 0.91-0.93; Gaussian noise features: 0.66, where the bound lets 5-15% through),
BOUND_MIN_KEPT = 0.8
# ... for a tile whose last full block let fewer than this share of its (chunk, query) pairs through:
# each costs one more pass of the screen, and the bound lets about three times as many through.
BOUND_BELOW = 0.002
# ... while bounded blocks let at most this share through. One that lets more through is multiplied
# again in full, and the tile waits 2, 4, 8, ... full blocks (at its 1st, 2nd, 3rd, ... such one)
# before it tries the bound again. The screen forms a bounded pair's entries in about 0.1 us (two
# threads), and multiplying a block again in full costs about 0.6 ms (efficientnet_lite0, 784 queries):
# that is screening 2% of its 307,000 pairs, and giving up also costs the full blocks the tile then
# waits for. 3% measured faster than 1% (0.120 against 0.125 s per image, five magnetic_tile images).
BOUND_GIVE_UP = 0.03


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
    """The ranking precision a setting means. "auto" is bfloat16 where the CPU multiplies it natively
    (about twice the float32 speed), float32 elsewhere. Either way the search returns the float32
    answer: bfloat16 only ranks, within bounds on its rounding (see the module docstring)."""
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and not bf16_supported():
        _warn_emulated_bf16()
    return precision


@lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    """Once per process, however many searches ask."""
    warnings.warn("bf16 ranking asked for, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): torch emulates "
                  "it, many times slower than fp32 ranking, for the same answers", RuntimeWarning, stacklevel=3)


def describe(precision: Precision) -> str:
    """How the pixel search runs on this machine, for logs and bug reports."""
    mode = resolve_precision(precision)
    isa = tiledot.instructions(torch.bfloat16 if mode == "bf16" else torch.float32)
    where = f"formed in registers ({isa})" if isa else "multiplied and written out"
    return f"{mode} ranking, its bound {where}"


def warm_up(precision: Precision = "auto") -> None:
    """Compile the pixel search's loops now, for ``precision``, instead of in the first real search.

    With an empty numba cache that takes about 20 s (then 0.2 s from the disk cache), so an app can
    call this in the background while its user is still choosing images. One small synthetic search
    takes every path a real one does: float16 gallery levels against a float32 query, a native level
    thick enough for either precision, and direct channels of low rank on a grid of 512 chunks, so that
    after an exact match the tiles settle on the bound (see _Candidates) and the last image is bounded.
    """
    rng = np.random.default_rng(0)
    shapes = [(24, 64), (40, 32), (112, 16)]  # channels and side, finest first, as efficientnet_lite0's
    query = [rng.standard_normal((side * side, 8)) @ rng.standard_normal((8, channels)) for channels, side in shapes]
    query = [torch.from_numpy(rows.T.reshape(channels, side, side)).float()
             for rows, (channels, side) in zip(query, shapes)]
    pyramid = [np.repeat(level.numpy()[None].astype(np.float16), 3, axis=0) for level in query]
    pyramid_knn(query, pyramid, np.arange(3), 1, precision)


def pyramid_knn(
    query: Sequence[torch.Tensor | np.ndarray],
    pyramid: Sequence[np.ndarray | torch.Tensor],
    indices: np.ndarray,
    kappa: int = 1,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Squared distances (H * W, kappa), ascending, from each pixel of a query image to its kappa
    nearest pixels among all pixels of the images ``indices`` of ``pyramid``.

    ``query``: the image's pyramid levels (C_l, h_l, w_l), finest first, as the backbone returns
    them (or as a bank stores them, for leave-one-out maps); ``pyramid``: per level
    (N, C_l, h_l, w_l), e.g. the bank's float16 memory maps. Pixels are compared as
    :func:`anomaly.features.stack_pyramid` stacks them (every level upsampled to the finest
    grid, channels concatenated), but neither side is ever stacked in full: only the K images'
    native levels are read. Images are searched in the order of ``indices``; nearest first,
    good candidates come early and most pixels of the later images are ruled out cheaply.
    """
    unique, position = np.unique(np.asarray(indices).reshape(-1), return_inverse=True)  # file order
    levels = [torch.from_numpy(np.ascontiguousarray(np.asarray(level[unique]).transpose(0, 2, 3, 1)))
              for level in pyramid]
    images = [[level[n] for level in levels] for n in position.reshape(-1)]
    query = [level.float() if isinstance(level, torch.Tensor) else torch.from_numpy(np.array(level, np.float32))
             for level in query]
    return _search([level.permute(1, 2, 0).contiguous() for level in query], images, kappa, precision)


def pixel_knn(
    queries: torch.Tensor,
    gallery: torch.Tensor | Iterable[torch.Tensor],
    kappa: int = 1,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Squared distances (P, kappa), ascending, from each query row (P, C) to its kappa nearest
    rows of a flat gallery: (G, C) rows, or an iterable of row blocks (all held in memory)."""
    rows = gallery if isinstance(gallery, torch.Tensor) else torch.cat([block.float() for block in gallery])
    return _search([queries.float()[None]], [[tile[None]] for tile in rows.split(GALLERY_TILE)], kappa, precision)


def _search(
    query: list[torch.Tensor], images: list[list[torch.Tensor]], kappa: int, precision: Precision
) -> torch.Tensor:
    """``query`` and each of ``images``: pixel-major levels (h_l, w_l, C_l), finest first."""
    if kappa < 1:
        raise ValueError(f"kappa must be at least 1, got {kappa}")
    mode = resolve_precision(precision)
    plan = _Plan(query, torch.bfloat16 if mode == "bf16" else torch.float32, FACTOR_MIN_CHANNELS[mode])
    if not images:
        return torch.full((len(plan.queries), kappa), float("inf"))
    tiles = _query_tiles(len(plan.queries), mode)
    found = [_Candidates(rows.stop - rows.start, kappa) for rows in tiles]
    offset = 0
    for image in images:
        gallery = plan.gallery(image)
        tolerance = plan.tolerance(gallery)
        for rows, candidates in zip(tiles, found):
            candidates.offer(lambda bounded, rows=rows: plan.distances(gallery, rows, bounded), offset,
                             tolerance.rows(rows))
        offset += gallery.pixels
    pairs = [candidates.final() for candidates in found]
    query_ids = torch.cat([ids + rows.start for rows, (ids, _) in zip(tiles, pairs)])
    pixel_ids = torch.cat([pixels for _, pixels in pairs])
    exact = _exact(plan.queries, images, query_ids, pixel_ids)
    return fused.smallest(exact, query_ids, len(plan.queries), kappa)


def _query_tiles(count: int, mode: Literal["fp32", "bf16"]) -> list[slice]:
    """``count`` queries in passes of at most QUERY_TILE[mode], as even as can be."""
    bounds = np.linspace(0, count, -(-count // QUERY_TILE[mode]) + 1).astype(int)
    return [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]


class _Candidates:
    """For a tile of queries, every gallery pixel that may still be among each one's kappa nearest.

    Each ranking distance brackets the exact distance (:class:`anomaly.fused.Tolerance`); a pixel stays while
    its lower end is within the kappa-th smallest upper end seen. Each gallery image's block of
    distances arrives as minima of CHUNK-pixel chunks (:class:`_Block`); only the chunks that pass
    are read entry by entry, and after the nearest images that is about one chunk per query per
    image. Candidates are pruned only now and then.
    """

    def __init__(self, count: int, kappa: int) -> None:
        self.kappa = kappa
        self.within = torch.full((count,), float("inf"))  # the kappa nearest are at most this far
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._size, self._merged_size = 0, 0
        self._settled = False  # its last full block let few enough through: try the bound
        self._failures, self._wait = 0, 0  # times the bound let too many through; full blocks still to go

    def offer(self, distances: Callable[[bool], _Block], offset: int, tolerance: fused.Tolerance) -> None:
        """Screen one gallery image's block, ``distances(bounded)``."""
        count = len(self.within)
        block, minima = self._multiply(distances, tolerance)
        # The kappa-th smallest entry of a block is at most its kappa-th smallest chunk minimum; a
        # bounded block's minima are lower bounds and say nothing of it.
        if block.bounded:
            kth = torch.full_like(self.within, float("inf"))
        elif self.kappa == 1:
            kth = None  # the smallest, found with the minima
        elif len(minima.values) >= self.kappa:
            kth = minima.values.topk(self.kappa, dim=0, largest=False).values[-1]
        else:
            kth = torch.full_like(self.within, float("inf"))
        lower, upper, query, rows = block.screen(minima, kth, self.within, tolerance)
        self._pending.append((lower, upper, query, rows + offset))
        self._size += len(upper)
        if self._size > 2 * self._merged_size + 8 * count * self.kappa:
            self._merge()

    def _multiply(self, distances: Callable[[bool], _Block], tolerance: fused.Tolerance
                  ) -> tuple[_Block, fused.Minima]:
        """The block to screen and its chunk minima: the bound where this tile has settled, unless it
        lets too much through; then this block again in full, and a wait before the next try."""
        if self._settled and self._wait == 0:
            block = distances(True)
            minima = block.chunk_minima(self.within, tolerance)
            if not block.bounded or minima.hits.sum() <= BOUND_GIVE_UP * minima.values.numel():
                return block, minima
            # Screening that many would cost more than the bound saves (while the bounds are loose,
            # or in features whose near pixels differ in many directions).
            self._failures += 1
            self._wait = 2**self._failures
        else:
            self._wait = max(0, self._wait - 1)
        block = distances(False)
        minima = block.chunk_minima(self.within, tolerance)
        self._settled = minima.hits.sum() < BOUND_BELOW * minima.values.numel()
        return block, minima

    def _merge(self) -> None:
        """Sharpen ``within`` from all candidates and drop those that cannot come within it."""
        lower, upper, query, ids = (torch.cat(parts) for parts in zip(*self._pending))
        keep = fused.prune(lower, upper, query, self.within, self.kappa, max(MAX_CANDIDATES, self.kappa))
        self._pending = [(lower[keep], upper[keep], query[keep], ids[keep])]
        self._size = self._merged_size = len(keep)

    def final(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, gallery pixel) pairs: all that can be among the kappa nearest."""
        self._merge()
        _, _, query, ids = self._pending[0]
        return query, ids


def _exact(queries: torch.Tensor, images: list[list[torch.Tensor]], query_ids: torch.Tensor,
           pixel_ids: torch.Tensor) -> torch.Tensor:
    """sum((q - g)^2) in float32 for each (query, gallery pixel) pair, each gallery pixel upsampled
    as :func:`anomaly.features.stack_pyramid` does, one level at a time in a compiled loop."""
    sizes = torch.tensor([image[0].shape[0] * image[0].shape[1] for image in images])
    starts = torch.cumsum(sizes, 0) - sizes
    owner = torch.bucketize(pixel_ids, starts, right=True) - 1
    order = owner.argsort(stable=True)
    bounds = torch.searchsorted(owner[order], torch.arange(len(images) + 1)).tolist()
    flat = queries.contiguous().numpy()
    out = np.empty(len(pixel_ids), np.float32)
    for n, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
        if low == high:
            continue
        where = order[low:high]
        ids, pixels = query_ids[where].numpy(), (pixel_ids[where] - starts[n]).numpy()
        size = tuple(images[n][0].shape[:2])
        found, column = np.zeros(high - low, np.float32), 0
        for level in images[n]:
            grid = tuple(level.shape[:2])
            taps = None if grid == size else _level_taps(grid, size)
            fused.add_level_distances(flat, column, ids, pixels, size[1], level, taps, found)
            column += level.shape[2]
        out[where.numpy()] = found
    return torch.from_numpy(out)


@lru_cache(maxsize=64)
def _level_taps(grid: tuple[int, int], size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Rows' then columns' first and second taps and their weights, upsampling ``grid`` to ``size``."""
    rows, cols = _axis(grid[0], size[0]), _axis(grid[1], size[1])
    return tuple(np.ascontiguousarray(part.numpy()) for axis in (rows, cols)
                 for part in (axis.first, axis.second, axis.weight_first, axis.weight_second))


@dataclass(frozen=True)
class _Axis:
    """Bilinear upsampling of one axis from n to N samples, weighted exactly as ``F.interpolate`` does."""

    matrix: torch.Tensor  # (N, n): upsampled = matrix @ native
    first: torch.Tensor  # (N,) lower native tap
    second: torch.Tensor  # (N,) upper native tap, clamped at the border
    weight_first: torch.Tensor  # (N,)
    weight_second: torch.Tensor  # (N,), 0 where the taps coincide


@lru_cache(maxsize=64)
def _axis(n: int, size: int) -> _Axis:
    basis = torch.eye(n)[:, None, :]
    matrix = F.interpolate(basis, size=size, mode="linear", align_corners=False)[:, 0, :].T.contiguous()
    first = (matrix > 0).int().argmax(1)
    second = (first + 1).clamp(max=n - 1)
    rows = torch.arange(size)
    weight_second = torch.where(second > first, matrix[rows, second], 0.0)
    return _Axis(matrix, first, second, matrix[rows, first], weight_second)


def _stacked_rows(levels: list[torch.Tensor], centers: list[torch.Tensor], size: tuple[int, int],
                  split: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`anomaly.fused.gallery_rows` of pixel-major (h, w, C) levels on the (H, W) grid, each
    upsampled from its own grid as ``F.interpolate`` does (read as it is where it is that grid)."""
    taps = [None if tuple(level.shape[:2]) == size else _level_taps(tuple(level.shape[:2]), size)
            for level in levels]
    return fused.gallery_rows(levels, centers, taps, size, split)


def _interpolate(products: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], out: torch.Tensor) -> None:
    """Upsample (X, h * w) rows over their (h, w) grid into ``out`` (X, H * W), as ``F.interpolate``
    would: across as one small product, then down in a compiled loop (torch's own kernel is
    several times slower on rows this long)."""
    h, w = grid
    rows = _axis(h, size[0])
    across = _matmul(products.view(-1, w), _axis(w, size[1]).matrix).view(-1, h, size[1])
    fused.mix_rows(across, rows.first, rows.second, rows.weight_first, rows.weight_second, out.view(-1, *size))


@lru_cache(maxsize=16)
def _native_taps(grids: tuple[tuple[int, int], ...], size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """The bilinear taps of every native level on the (H, W) grid, as :class:`anomaly.fused.Terms`
    takes them: rows (L, H, 2) as the coarse rows of their first pixels (the levels' native pixels
    stacked in order) and their weights, columns (L, W, 2) and theirs, and the native widths (L,)."""
    rows, row_weights, cols, col_weights, base = [], [], [], [], 0
    for h, w in grids:
        first_y, second_y, weight_first_y, weight_second_y, first_x, second_x, weight_first_x, weight_second_x = \
            _level_taps((h, w), size)
        rows.append(np.stack([first_y, second_y], 1) * w + base)
        row_weights.append(np.stack([weight_first_y, weight_second_y], 1))
        cols.append(np.stack([first_x, second_x], 1))
        col_weights.append(np.stack([weight_first_x, weight_second_x], 1))
        base += h * w

    def stacked(parts: list[np.ndarray], length: int, dtype: np.dtype) -> np.ndarray:
        return np.stack(parts).astype(dtype) if parts else np.zeros((0, length, 2), dtype)

    return (stacked(rows, size[0], np.int64), stacked(row_weights, size[0], np.float32),
            stacked(cols, size[1], np.int64), stacked(col_weights, size[1], np.float32),
            np.array([w for _, w in grids], np.int64))


@dataclass
class _GalleryImage:
    direct: torch.Tensor | None  # (H * W, C_direct + 4) operand of the full finest-grid product, once used
    rows: torch.Tensor  # (H * W, C_direct + 4) float32 rows it is rounded from, centred
    bound: torch.Tensor | tuple[np.ndarray, np.ndarray] | None  # (H * W, BOUND_RANK + 4) operand of the bounded
    # product, once used, or a TiledProduct's gallery side (packed rows, norms)
    terms: fused.Terms  # what the native levels add to that product, less the interpolation spread
    size: tuple[int, int]  # finest grid (H, W)
    longest: float  # bound on the norm of a centred pixel, all levels (float32 error bounds)
    longest_direct: float  # largest norm of a centred direct row (bfloat16 error bounds)

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]


@dataclass(frozen=True)
class _Block:
    """The ranking distances of query columns ``start:start + P_t`` to one gallery image, never
    formed in full: their chunk minima come from one compiled pass (:mod:`anomaly.fused`), and
    then the entries of the chunks that pass."""

    product: torch.Tensor | fused.TiledProduct  # (G, P_t) finest-grid product, or a lower bound of it
    terms: fused.Terms
    start: int
    bounded: bool = False  # the product is a lower bound
    exact: tuple[np.ndarray, np.ndarray] | None = None  # the rows that give the product exactly, for the screen

    def chunk_minima(self, within: torch.Tensor, tolerance: fused.Tolerance) -> fused.Minima:
        return fused.chunk_minima(self.product, self.terms, self.start, CHUNK, within, tolerance)

    def screen(self, minima: fused.Minima, kth: torch.Tensor | None, within: torch.Tensor,
               tolerance: fused.Tolerance) -> tuple[torch.Tensor, ...]:
        """:func:`anomaly.fused.screen` on this block."""
        return fused.screen(self.product, self.terms, self.start, CHUNK, minima, kth, within, tolerance, self.exact)


class _Plan:
    """The query side of one search, and how each gallery image is multiplied with it.

    Thin levels are upsampled and multiplied on the finest grid, in ``dtype``. Thick coarse
    levels (``native_from`` channels or more) are multiplied at native resolution on both
    sides, in float32 as that is cheap there; the products are interpolated over the query
    grid once per gallery image, and over the gallery grid inside the compiled pass. The bound is
    formed in registers (a :class:`anomaly.fused.TiledProduct`) where the CPU can (bfloat16 with
    AVX512-BF16, float32 with AVX-512 or AVX2), unless ``registers`` is False; otherwise it is multiplied
    and written out.
    """

    def __init__(self, query: list[torch.Tensor], dtype: torch.dtype, native_from: int, registers: bool = True
                 ) -> None:
        self.dtype = dtype
        self.size = tuple(query[0].shape[:2])
        self.channels = [part.shape[-1] for part in query]
        self.native = [level > 0 and c >= native_from for level, c in enumerate(self.channels)]
        # Every query pixel, all levels upsampled (uncentred), for the exact recompute.
        self.queries = _stacked_rows(query, [torch.zeros(c) for c in self.channels], self.size)[0][:, :-4]
        # Distances do not change when both sides move by the same vector; centring on the
        # query's mean pixel shrinks the norms, and with them the products' rounding errors.
        self.centers = [part.reshape(-1, part.shape[-1]).mean(0) for part in query]
        direct_rows, direct_squares = self._direct_rows(query, split=False)
        direct = direct_rows[:, :-4]
        self.direct = _query_operand(direct, direct_squares, dtype)
        # The bound: |B^T (q - g)|^2 <= |q - g|^2 for orthonormal columns B. Projected on the query's
        # leading principal directions, its nearest pixels keep most of their distances.
        # Where those directions hold too little of the pixels' spread, near pixels differ in many more
        # (noise-like features), and the bound lets through too much to pay.
        self._rows = np.ascontiguousarray(direct.numpy())
        self._basis: torch.Tensor | None = None  # (BOUND_RANK + 4, C_direct + 4), as _principal_directions
        # The query side of the bound, one of: the operand of a product written out, or (formed in registers,
        # see TiledProduct) -2 q packed by tiledot.pack_columns and |q|^2.
        self._bound: torch.Tensor | None = None
        self._tiled_queries: tuple[np.ndarray, np.ndarray] | None = None
        if direct.shape[1] >= max(BOUND_MIN_CHANNELS, BOUND_RANK + 1):
            basis, kept = _principal_directions(direct, BOUND_RANK)
            if kept >= BOUND_MIN_KEPT:
                self._basis = basis
                projected = _matmul(direct_rows, basis)[:, :-4]  # as distances() projects the gallery's
                squares = projected.pow(2).sum(1)
                if registers and tiledot.supported(dtype):
                    self._tiled_queries = (tiledot.pack_columns((-2.0 * projected).to(dtype)),
                                           np.pad(squares.numpy(), (0, tiledot.LANES)))
                else:
                    self._bound = _query_operand(projected, squares, dtype)
        # The native levels' own pixels, centred and measured as gallery() does the gallery's.
        natives = [(_stacked_rows([part], [center], tuple(part.shape[:2])), tuple(part.shape[:2]))
                   for part, center, native in zip(query, self.centers, self.native) if native]
        self.factored = [(_query_operand(rows[:, :-4], squares, torch.float32), grid)
                         for (rows, squares), grid in natives]
        # The native levels' products, interpolated over the query grid, are written here for
        # each gallery image in turn (a fresh block would cost a page fault per 4 KiB).
        self._coarse: torch.Tensor | None = None
        # What tolerance() needs from the query side: norms of the direct rows, and a bound on the
        # whole pixel's (a native level's largest pixel stands for the taps it is mixed from).
        self._direct_norms = direct_squares.sqrt().numpy()
        self._norms = (direct_squares + sum(float(squares.max()) for (_, squares), _ in natives)).sqrt().numpy()
        # The longest inner dimension of a float32 (or float32-accumulated) product; a bound's are
        # two in turn (projecting the rows, then multiplying).
        self._inner = 4 + max([direct.shape[1]] + [c for c, native in zip(self.channels, self.native) if native])
        if self._basis is not None:
            self._inner += direct.shape[1] + 4
        self._spread = sum((fused.mix_spread(part, _level_taps(tuple(part.shape[:2]), self.size), self.size)
                            for part, native in zip(query, self.native) if native), torch.zeros(len(direct)))

    def gallery(self, levels: list[torch.Tensor]) -> _GalleryImage:
        """The gallery side of one image. Its terms share one buffer with the previous image's:
        search each image before preparing the next."""
        if [level.shape[-1] for level in levels] != self.channels:
            raise ValueError(f"query levels have {self.channels} channels, gallery levels "
                             f"{[level.shape[-1] for level in levels]}")
        # A bank's float16 levels, widened once here (exactly, with F16C), are read many times below: faster
        # than the loops' table reads, and their float32 versions are compiled anyway, for the query.
        levels = [level.float() for level in levels]
        size = tuple(levels[0].shape[:2])
        natives = [(level, center) for level, center, native in zip(levels, self.centers, self.native) if native]
        grids = tuple(tuple(level.shape[:2]) for level, _ in natives)
        rows = sum(h * w for h, w in grids)
        if self._coarse is None or self._coarse.shape[0] != rows:
            self._coarse = torch.empty(rows, len(self.queries))
        spread, row, native_squares = torch.zeros(size[0] * size[1]), 0, 0.0
        for (level, center), (operand, query_grid), grid in zip(natives, self.factored, grids):
            spread += fused.mix_spread(level, _level_taps(grid, size), size)
            operand_rows, squares = _stacked_rows([level], [center], grid)
            native = _matmul(operand_rows, operand)
            _interpolate(native, query_grid, self.size, out=self._coarse[row : row + len(native)])
            row += len(native)
            native_squares += float(squares.max())
        terms = fused.Terms(self._coarse.numpy(), *_native_taps(grids, size), spread.numpy())
        stacked, norms = self._direct_rows(levels, split=self.dtype == torch.bfloat16)
        direct_squares = float(norms.max())
        return _GalleryImage(None, stacked, None, terms, size, (direct_squares + native_squares) ** 0.5,
                             direct_squares**0.5)

    def _direct_rows(self, levels: list[torch.Tensor], split: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`_stacked_rows` of the levels multiplied on the finest grid, centred on the query's
        centres: the same rows on both sides of the finest-grid product."""
        direct = [(level, center) for level, center, native in zip(levels, self.centers, self.native) if not native]
        return _stacked_rows([level for level, _ in direct], [center for _, center in direct],
                             tuple(levels[0].shape[:2]), split)

    def tolerance(self, gallery: _GalleryImage) -> fused.Tolerance:
        """How far the ranking distances to ``gallery`` can be from the exact ones.

        Float32 rounding: a product's sum of K terms x_i y_i is off by at most K u sum |x_i y_i|
        (u = 2^-24, the worst case), and with the norm columns that sum is at most (|q| + |g|)^2.
        16 more units of the same size are a margin for the rest: the gallery pixel's norm and
        interpolation spread, and the interpolations and sums of levels (what is the same for all
        of a query's candidates, its own norm and spread, cancels in the comparisons). That margin
        is not a worst case for wide levels (their norms and spreads are sums of up to 1,024
        squares), but rounding errors grow like the square root of such counts in practice, and
        the worst case (about 8 K units) let 20-50 candidates per query through on wide_resnet50_2
        instead of 3. Without any of this, pixels far from the query's mean lose neighbours closer
        than float32 resolves at their norms.

        bfloat16 ranking adds its own: rounding each operand entry (relative u = 2^-8) moves
        -2 q.g by at most 2 (2u + u^2) |q| |g| (Cauchy-Schwarz) and the hi/lo norm columns by
        u^2 (|q|^2 + |g|^2); rounding the product itself, a distance, adds u of it. Distances the
        screen forms again from the float32 rows (``exact_slack``) carry float32's bound alone.
        """
        spread = self._spread.numpy()
        slack = np.float32((self._inner + 16) * FP32_ROUNDOFF) * np.square(self._norms + np.float32(gallery.longest))
        if self.dtype == torch.float32:
            return fused.Tolerance(spread, slack, 0.0)
        u, q, g = BF16_ROUNDOFF, self._direct_norms, np.float32(gallery.longest_direct)
        operands = np.float32(2 * (2 * u + u * u)) * q * g + np.float32(u * u) * (np.square(q) + g * g)
        return fused.Tolerance(spread, (operands + slack) * np.float32(1 + u), u, exact_slack=slack)

    def distances(self, gallery: _GalleryImage, rows: slice, bounded: bool = False) -> _Block:
        """The ranking distances of query rows ``rows``: each is the squared distance, plus the
        query's own interpolation spread when levels are native (the same for all its candidates).
        ``bounded``: lower bounds of them where the plan has a bound (the tolerance holds for both,
        as projections are no longer than the rows), to be made exact entry by entry by the screen."""
        exact = (self._rows, gallery.rows.numpy())
        if bounded and self._basis is not None:
            if gallery.bound is None:
                projected = _matmul(gallery.rows, self._basis)
                if self._tiled_queries is None:
                    gallery.bound = fused.fill_norm_columns(projected, self.dtype == torch.bfloat16).to(self.dtype)
                else:
                    projected = projected[:, :-4]
                    gallery.bound = (tiledot.pack_rows(projected.to(self.dtype), tiledot.ROWS),
                                     projected.pow(2).sum(1).numpy())
            if self._tiled_queries is None:
                product = _matmul(gallery.bound, self._bound[rows])
            else:
                product = fused.TiledProduct(gallery.bound[0], gallery.bound[1], *self._tiled_queries,
                                             rows.stop - rows.start)
            return _Block(product, gallery.terms, rows.start, True, exact)
        if gallery.direct is None:
            gallery.direct = gallery.rows.to(self.dtype)
        # A bfloat16 product's entries are formed again from the rows where they pass, to be bracketed by
        # float32's tolerance: bfloat16's, at the scale of the pixels' norms, kept 48 candidates per query
        # instead of 1.2 where near pixels are much closer than that (bottle's uniform backgrounds).
        return _Block(_matmul(gallery.direct, self.direct[rows]), gallery.terms, rows.start, False,
                      exact if self.dtype == torch.bfloat16 else None)


# Float32 products of at least this many multiply-adds go to oneDNN (see _matmul). Its linear costs about 20 us a
# call whatever the size (a 4 x 8 by 4 x 8 product: 24 us against torch.mm's 2.6), which dominated the gallery's
# small products (about 150 per query image, 2-7 million multiply-adds each).
ONEDNN_MIN_PRODUCT = 2**24


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``. torch hands float32 products to MKL, which runs only its AVX2 code on AMD
    CPUs; oneDNN (torch's bfloat16 path anyway) uses AVX-512 there: twice as fast, same fp32.
    Small products stay with torch, where oneDNN's fixed cost per call would outweigh that."""
    if a.dtype == torch.float32 and len(a) * len(b) * a.shape[1] >= ONEDNN_MIN_PRODUCT and _onednn_float32():
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


@lru_cache(maxsize=1)
def _onednn_float32() -> bool:
    """Whether this torch build has oneDNN's linear, and it agrees with torch.mm."""
    a, b = torch.randn(8, 16), torch.randn(4, 16)
    try:
        product = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        return bool(torch.allclose(product, a @ b.T, atol=1e-5))
    except (AttributeError, RuntimeError):
        return False


def _principal_directions(rows: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """The leading principal directions of (centred) ``rows`` (C columns), and the share of the rows'
    sum of squares they hold. The directions as (rank + 4, C + 4) orthonormal rows, shrunk by 2^-12
    so that no rounding makes a projection longer than its vector (the bound must hold), and padded
    with zeros: times a gallery row ``[g, 1, 1, hi, lo]`` it projects g and leaves four columns for
    the projection's norm."""
    values, vectors = torch.linalg.eigh((rows.T @ rows).double())  # ascending
    basis = torch.zeros(rank + 4, rows.shape[1] + 4)
    basis[:rank, : rows.shape[1]] = (vectors[:, -rank:] * (1 - 2.0**-12)).T.float()
    return basis, float(values[-rank:].sum() / values.sum().clamp_min(1e-300))


def _query_operand(x: torch.Tensor, norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[-2 x, |x|^2 hi, lo, 1, 1]`` for rows x and their squared ``norms`` (as
    :func:`anomaly.fused.gallery_rows` returns both): times a gallery row ``[g, 1, 1, |g|^2 hi, lo]``
    it is |q|^2 + |g|^2 - 2 q.g, so the squared distance itself comes out of the product, with the
    norms kept to twice the precision of ``dtype``."""
    hi = norms.to(dtype)
    halves = torch.stack([hi, (norms - hi.float()).to(dtype)], 1)
    return torch.cat([(-2.0 * x).to(dtype), halves, torch.ones(len(x), 2, dtype=dtype)], 1)
