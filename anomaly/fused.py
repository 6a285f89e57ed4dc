"""Compiled loops for the pixel search: ranking distances are reduced as they are formed.

A ranking distance is the finest-grid matrix product plus the coarse levels' products,
interpolated over the gallery grid, less the gallery pixel's interpolation spread (see
:mod:`anomaly.search`). Formed with torch ops, each term is one more pass over a block of
about 2.5 million entries per query tile and gallery image, and those passes, not the
matrix products, used to take most of the search's time. Here one loop forms each gallery
pixel's entries in cache (the coarse products mixed down once per row of the gallery grid,
then across per pixel) and keeps only the minima of chunks, runs along a row; a second,
serial one screens the chunks that pass against each query's bound and forms their entries.
Smaller loops prepare each gallery image (its operand rows and interpolation spread, read
straight from the bank's float16 levels), interpolate the coarse products down the query
grid, and recompute the candidates' exact distances, mixing each pixel's taps as
``F.interpolate`` does. Each replaced a dozen or more torch calls, whose fixed costs add up
at about 200 blocks and 50 gallery images per query image.

numba compiles the loops on first use (about 20 s for a bfloat16 search's, then cached on disk). The minima
loop runs on numba's own thread team (OpenMP or TBB where available), as many threads as
torch uses; that measured 10-15% faster per search than handing row ranges to a Python
thread pool.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import torch
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, overload

from anomaly import tiledot
from anomaly.jit import compiled


@dataclass(frozen=True)
class Terms:
    """What a gallery image adds to its finest-grid product, per gallery pixel g = (y, x): for each
    native level l, its coarse products mixed down from two native rows, then across from two native
    columns, ``sum_j cols_w[l, x, j] * sum_i rows_w[l, y, i] * coarse[rows[l, y, i] + cols[l, x, j]]``,
    and then ``- spread[g]``. Bilinear taps are separable: the rows' mix is formed once per gallery
    row and shared by its pixels."""

    coarse: np.ndarray  # (R, P) float32: the native levels' products, interpolated over the query grid
    rows: np.ndarray  # (L, H, 2) int64: the coarse row of each native row's first pixel
    row_weights: np.ndarray  # (L, H, 2) float32, 0 for an unused tap
    cols: np.ndarray  # (L, W, 2) int64 native columns
    col_weights: np.ndarray  # (L, W, 2) float32, 0 for an unused tap
    widths: np.ndarray  # (L,) int64 native widths
    spread: np.ndarray  # (H * W,) float32

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The fields in order, as the loops take them."""
        return (self.coarse, self.rows, self.row_weights, self.cols, self.col_weights, self.widths, self.spread)


@dataclass(frozen=True)
class Minima:
    """A block's chunk minima, and what the screen needs of them."""

    values: torch.Tensor  # (chunks, P_t) float32
    smallest: torch.Tensor  # (P_t,) each query's least chunk minimum
    hits: np.ndarray  # (chunks,) how many of a chunk's minima were within reach of the bounds before the block


@dataclass(frozen=True)
class TiledProduct:
    """Squared distances |q|^2 + |g|^2 - 2 q.g that are never written out: the minima loop forms them where
    it uses them, q.g with :func:`anomaly.tiledot.tile` in bfloat16 or float32 (where
    :func:`anomaly.tiledot.supported`), the squared norms in float32. Query columns are ``start:start +
    count`` of the ones packed, as for a product (G, count)."""

    gallery: np.ndarray  # (G + tiledot.ROWS, pairs or columns) int32 or float32: tiledot.pack_rows of the rows g
    gallery_norms: np.ndarray  # (G,) float32 |g|^2
    queries: np.ndarray  # (pairs or columns, P + tiledot.LANES), the same type: tiledot.pack_columns of -2 q
    query_norms: np.ndarray  # (P + tiledot.LANES,) float32 |q|^2
    count: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.gallery) - tiledot.ROWS, self.count


def chunk_minima(product: torch.Tensor | TiledProduct, terms: Terms, start: int, chunk: int, within: torch.Tensor,
                 tolerance: "Tolerance") -> Minima:
    """(H * ceil(W / chunk), P_t) float32 minima of ranking distances over chunks of up to ``chunk``
    pixels of one gallery row (chunk c: row c // ceil(W / chunk), its (c % ceil(W / chunk))-th run);
    ``product`` (H * W, P_t) is bfloat16 or float32, or a :class:`TiledProduct`, for query columns
    ``start:start + P_t``.
    ``within`` (P_t,) and ``tolerance``, as :func:`screen` will take them, only count the hits: as
    :func:`screen` can only lower ``within``, a chunk without any cannot pass there."""
    height, width = terms.rows.shape[1], terms.cols.shape[1]
    minima = np.empty((height * -(-width // chunk), product.shape[1]), np.float32)
    hits = np.empty(len(minima), np.int32)
    reach = _reach(within.numpy(), tolerance.offset, tolerance.slack, np.float32(tolerance.roundoff))
    with _team():
        smallest = np.full((numba.get_num_threads(), product.shape[1]), np.inf, np.float32)
        if isinstance(product, TiledProduct):
            if chunk > tiledot.ROWS:
                raise ValueError(f"a TiledProduct's chunks are at most {tiledot.ROWS} pixels, got {chunk}")
            amx = (product.gallery.dtype == np.int32 and product.gallery.shape[1] <= tiledot.AMX_PAIRS
                   and tiledot.instructions(torch.bfloat16) == "AMX-BF16")
            loop = _amx_minima if amx else _tiled_minima
            loop(product.gallery, product.gallery_norms, product.queries, product.query_norms,
                 *terms.arrays(), start, chunk, reach, minima, hits, smallest)
        else:
            _chunk_minima(_as_numpy(product), *terms.arrays(), start, chunk, reach, minima, hits, smallest)
    return Minima(torch.from_numpy(minima), torch.from_numpy(smallest.min(0)), hits)


@dataclass(frozen=True)
class Tolerance:
    """What a query's ranking distances r to one gallery image say about the exact ones d:
    ``r - offset`` lies within ``d * (1 +- roundoff) +- slack``. So d is at least
    ``(r - offset - slack) / (1 + roundoff)`` and at most ``(r - offset + slack) / (1 - roundoff)``.
    A distance the screen forms again from exact rows (see :func:`screen`) lies within ``exact_slack``
    of d, with no roundoff: in bfloat16 ranking that is float32's bound, far tighter."""

    offset: np.ndarray  # (P,) float32: the query's own interpolation spread, in every ranking distance
    slack: np.ndarray  # (P,) float32 absolute error bound
    roundoff: float  # relative error bound (rounding of a bfloat16 product itself)
    exact_slack: np.ndarray | None = None  # (P,) float32, for distances formed from exact rows; None: slack

    def rows(self, rows: slice) -> "Tolerance":
        """The tolerance of queries ``rows`` only (views)."""
        exact_slack = None if self.exact_slack is None else self.exact_slack[rows]
        return Tolerance(self.offset[rows], self.slack[rows], self.roundoff, exact_slack)


def screen(product: torch.Tensor | TiledProduct, terms: Terms, start: int, chunk: int, minima: Minima,
           kth: torch.Tensor | None, within: torch.Tensor, tolerance: Tolerance,
           exact: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, ...]:
    """The entries that may still be among their query's nearest, from the chunks of
    :func:`chunk_minima`; the same sums, term by term in the same order.

    ``within`` (P_t,) float32, each query's bound on its kappa-th nearest exact distance, is first
    lowered in place to the upper end of ``kth``: the kappa-th smallest chunk minimum (+inf where
    there are fewer), or None for the smallest. Returns (lower ends, upper ends, query columns,
    gallery pixels) of the entries whose lower end is within it.

    With ``exact`` (all query rows (P, C) and the gallery's rows (H * W, >= C), float32), ``product``
    is only a lower bound or an approximation of the finest-grid part: an entry that passes has that part
    recomputed as ``sum((q - g)^2)`` over those C columns, and then is tested as any other, bracketed by
    the tolerance's ``exact_slack``.
    """
    query_rows, gallery_rows = (_NO_ROWS, _NO_ROWS) if exact is None else exact
    product = _NO_PRODUCT if isinstance(product, TiledProduct) else _as_numpy(product)
    with _team():
        found = _screen(product, *terms.arrays(), start, chunk, minima.values.numpy(), minima.hits,
                        (minima.smallest if kth is None else kth).numpy(), within.numpy(), tolerance.offset,
                        tolerance.slack, np.float32(tolerance.roundoff),
                        tolerance.slack if tolerance.exact_slack is None else tolerance.exact_slack,
                        query_rows, gallery_rows)
    return tuple(torch.from_numpy(array) for array in found)


def prune(lower: torch.Tensor, upper: torch.Tensor, query: torch.Tensor, within: torch.Tensor, kappa: int,
          cap: int) -> torch.Tensor:
    """Lower ``within`` (P,) in place to each query's kappa-th smallest upper end among the entries
    (lower end, upper end, query), and return the indices of the entries that stay: lower end within
    it, and among their query's ``cap`` smallest upper ends (ties: first come first)."""
    return torch.from_numpy(_prune(lower.numpy(), upper.numpy(), query.numpy(), within.numpy(), kappa, cap))


def smallest(values: torch.Tensor, query: torch.Tensor, count: int, kappa: int) -> torch.Tensor:
    """(count, kappa): each query's kappa smallest ``values``, ascending, +inf where it has fewer."""
    return torch.from_numpy(_smallest(values.numpy(), query.numpy(), count, kappa))


def mix_rows(source: torch.Tensor, first: torch.Tensor, second: torch.Tensor, weight_first: torch.Tensor,
             weight_second: torch.Tensor, out: torch.Tensor) -> None:
    """``out[r, i] = weight_first[i] * source[r, first[i]] + weight_second[i] * source[r, second[i]]``
    for (R, n, W) float32 ``source`` and (R, N, W) ``out``: bilinear upsampling down the middle axis."""
    with _team():
        _mix_rows(source.numpy(), first.numpy(), second.numpy(), weight_first.numpy(), weight_second.numpy(),
                  out.numpy())


def add_level_distances(queries: np.ndarray, column: int, query_ids: np.ndarray, pixels: np.ndarray, width: int,
                        level: torch.Tensor, taps: tuple[np.ndarray, ...] | None, out: np.ndarray) -> None:
    """``out[m] += sum_c (queries[query_ids[m], column + c] - g_c)^2`` over the channels of one gallery
    level (h, w, C), g its pixel ``pixels[m]`` of the finest grid (``width`` wide): the level's own pixel
    when ``taps`` is None, else mixed from four (rows first, second, weights; columns likewise), across
    then down in float32, the order of ``F.interpolate``."""
    with _team():
        _add_level_distances(queries, column, query_ids, pixels, width, _level_values(level), _HALF, taps is not None,
                             *(_NO_TAPS if taps is None else taps), out)


def gallery_rows(levels: list[torch.Tensor], centers: list[torch.Tensor], taps: list[tuple[np.ndarray, ...] | None],
                 size: tuple[int, int], split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gallery side of a product: (H * W, C + 4) float32 rows ``[x, 1, 1, hi, lo]`` and the (H * W,)
    squared norms ``hi + lo`` of x, where x is each pixel of the (H, W) grid with the levels (h, w, C_l)
    stacked, each centred on its ``centers`` entry and mixed from its ``taps`` as in
    :func:`add_level_distances` (None: read as it is). With ``split``, hi is the norm rounded to
    bfloat16, so that the row converted to bfloat16 still carries the norm to 16 bits."""
    channels = sum(level.shape[2] for level in levels)
    out = np.empty((size[0] * size[1], channels + 4), np.float32)
    norms = np.zeros(size[0] * size[1], np.float32)
    column = 0
    with _team():
        for level, center, level_taps in zip(levels, centers, taps):
            _centred_rows(_level_values(level), _HALF, center.numpy(), level_taps is not None,
                          *(_NO_TAPS if level_taps is None else level_taps), size[1], column, out, norms)
            column += level.shape[2]
    _norm_columns(norms, split, column, out)
    return torch.from_numpy(out), torch.from_numpy(norms)


def fill_norm_columns(rows: torch.Tensor, split: bool) -> torch.Tensor:
    """Write ``[1, 1, hi, lo]`` into the last four columns of (N, C + 4) float32 ``rows``, for the squared
    norm ``hi + lo`` of the first C, as :func:`gallery_rows` does; returns ``rows``."""
    values = rows.numpy()
    _norm_columns(_row_norms(values, values.shape[1] - 4), split, values.shape[1] - 4, values)
    return rows


def mix_spread(level: torch.Tensor, taps: tuple[np.ndarray, ...], size: tuple[int, int]) -> torch.Tensor:
    """(H * W,) per pixel of the (H, W) grid, sum_t w_t |b_t|^2 - |sum_t w_t b_t|^2 over its four taps b_t
    on the (h, w, C) level: how much interpolating squared distances overshoots the distance to the
    interpolated pixel. Computed as the taps' weighted spread sum_{s<t} w_s w_t |b_s - b_t|^2, from the
    squared gaps between neighbouring native pixels (no cancellation, and any centring cancels)."""
    out = np.empty(size[0] * size[1], np.float32)
    with _team():
        _mix_spread(_level_values(level), _HALF, *taps, size[1], out)
    return torch.from_numpy(out)


def _level_values(level: torch.Tensor) -> np.ndarray:
    """A level as the loops read it: float16 as its bits (widened through _HALF), else float32."""
    return level.numpy().view(np.uint16) if level.dtype == torch.float16 else level.float().numpy()


# Typed stand-ins for screen's rows when its product is the entries themselves, and for its product when it is
# a TiledProduct.
_NO_ROWS = np.zeros((0, 0), np.float32)
_NO_PRODUCT = np.zeros((0, 0), np.int16)
# Typed stand-ins for the rows' and columns' taps of a level read as it is (the loop never touches them).
_NO_TAPS = ((np.zeros(1, np.int64),) * 2 + (np.zeros(1, np.float32),) * 2) * 2


def _threads() -> int:
    """torch's thread count, as far as numba's team goes."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _as_numpy(product: torch.Tensor) -> np.ndarray:
    """numba has no bfloat16: its bits travel as int16 (the loops widen them to float32 exactly)."""
    return product.view(torch.int16).numpy() if product.dtype == torch.bfloat16 else product.numpy()


# numba falls back to its "workqueue" threads where neither OpenMP nor TBB is installed, and
# those must not be entered from two Python threads at once (dashboard sessions).
_LAUNCH = threading.Lock()


@contextmanager
def _team():
    """Hold numba's thread team for one parallel loop, sized as torch's."""
    with _LAUNCH:
        numba.set_num_threads(_threads())
        yield


# Plain IEEE arithmetic (no fast-math): the vectorised minima and the scalar entries must agree
# to the last bit, or a chunk's best entry could fail its own bound.
_FLAGS = dict(nogil=True, boundscheck=False)


@intrinsic
def _float_from_bits(typingctx, bits):
    """Reinterpret uint32 bits as a float32 (numba has no scalar bit cast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float(typingctx, value):
    """Reinterpret a float32 as its uint32 bits."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


def _widen(value):
    """A product entry as float32: bfloat16 bits (int16) go to the high half, exactly."""


@overload(_widen)
def _widen_typed(value):
    if isinstance(value, types.Integer):
        return lambda value: _float_from_bits(np.uint32(np.uint16(value)) << np.uint32(16))
    return lambda value: value


@compiled(parallel=True, **_FLAGS)
def _chunk_minima(product, coarse, rows, row_weights, cols, col_weights, widths, spread, start, chunk, reach, minima,
                  hits, smallest):
    """One gallery row at a time: its native levels' rows mixed once into a small buffer, then each
    pixel's entries formed from two of them and reduced into its chunk's minima, all cache-resident;
    each finished chunk is counted against ``reach`` and folded into its thread's row of ``smallest``."""
    count, levels, width = product.shape[1], rows.shape[0], cols.shape[1]
    runs = (width + chunk - 1) // chunk
    if levels == 0:
        for c in numba.prange(minima.shape[0]):
            low = minima[c]
            low[:] = np.inf
            first = (c // runs) * width + (c % runs) * chunk
            for g in range(first, first + min(chunk, width - (c % runs) * chunk)):
                src, s = product[g], spread[g]
                for p in range(count):
                    low[p] = min(low[p], _widen(src[p]) - s)
            _tally(low, reach, c, hits, smallest[numba.get_thread_id()])
        return
    offsets = _level_offsets(widths)
    for y in numba.prange(rows.shape[1]):
        mixed = np.empty((offsets[levels], count), np.float32)
        row = np.empty(count, np.float32)
        _mix_down(coarse, rows, row_weights, y, start, offsets, mixed)
        for c in range(runs):
            low = minima[y * runs + c]
            low[:] = np.inf
            for x in range(c * chunk, min(c * chunk + chunk, width)):
                _fold_pixel(low, row, product[y * width + x], None, mixed, offsets, cols, col_weights, x,
                            -spread[y * width + x])
            _tally(low, reach, y * runs + c, hits, smallest[numba.get_thread_id()])


def _plus(value, extra, p):
    """``value + extra[p]``, or ``value`` itself where ``extra`` is None (not even + 0)."""


@overload(_plus)
def _plus_typed(value, extra, p):
    if isinstance(extra, types.NoneType):
        return lambda value, extra, p: value
    return lambda value, extra, p: value + extra[p]


@compiled(inline="always", **_FLAGS)
def _fold_pixel(low, row, src, extra, mixed, offsets, cols, col_weights, x, tail):
    """Fold one gallery pixel's entries into its chunk's minima ``low``: each is ``src[p]`` widened (plus
    ``extra[p]`` where given), plus each native level's two mixed rows at gallery column x, level by level,
    plus ``tail``: the order :func:`_entry` sums them in. ``row``: room for the sums of several levels."""
    count, levels = low.shape[0], offsets.shape[0] - 1
    if levels == 0:
        for p in range(count):
            low[p] = min(low[p], _plus(_widen(src[p]), extra, p) + tail)
        return
    for k in range(levels):
        m0, m1 = mixed[offsets[k] + cols[k, x, 0]], mixed[offsets[k] + cols[k, x, 1]]
        b0, b1 = col_weights[k, x, 0], col_weights[k, x, 1]
        if levels == 1:
            for p in range(count):
                low[p] = min(low[p], _plus(_widen(src[p]), extra, p) + (b0 * m0[p] + b1 * m1[p]) + tail)
        elif k == 0:
            for p in range(count):
                row[p] = _plus(_widen(src[p]), extra, p) + (b0 * m0[p] + b1 * m1[p])
        elif k < levels - 1:
            for p in range(count):
                row[p] = row[p] + (b0 * m0[p] + b1 * m1[p])
        else:
            for p in range(count):
                low[p] = min(low[p], row[p] + (b0 * m0[p] + b1 * m1[p]) + tail)


def _closing_over(digest: str):
    """:func:`_tiled_minima` and :func:`_amx_minima` closed over ``digest``, tiledot.py's: numba's disk cache
    keys a loop on its own file and on the values it closes over, not on the files of what it calls, so without
    this an edit of tiledot.py would leave the loops running the old tiles from the cache."""

    @compiled(parallel=True, **_FLAGS)
    def _tiled_minima(gallery, gallery_norms, queries, query_norms, coarse, rows, row_weights, cols, col_weights,
                      widths, spread, start, chunk, reach, minima, hits, smallest):
        """:func:`_chunk_minima` of a :class:`TiledProduct`: per gallery row, the native levels' rows mixed once,
        and the queries' norms as one more row; per chunk, which of those rows its pixels take and with what
        weights; then per LANES queries :func:`anomaly.tiledot.tile` sums each entry's terms and product in
        registers and takes the minima."""
        digest  # noqa: B018 (a use, so that the loop closes over it: see _closing_over)
        count, levels, width = minima.shape[1], rows.shape[0], cols.shape[1]
        lanes, most = tiledot.LANES, tiledot.ROWS
        runs = (width + chunk - 1) // chunk
        offsets = _level_offsets(widths)
        for y in numba.prange(rows.shape[1]):
            # Columns past count are read by the last tile, never used.
            mixed = np.empty((offsets[levels] + 1, count + lanes), np.float32)
            _mix_down(coarse, rows, row_weights, y, start, offsets, mixed[:, :count])
            mixed[offsets[levels]] = query_norms[start : start + count + lanes]
            sources = np.empty(2 * most * levels + 1, np.int64)
            weights = np.empty((most, 2 * most * levels + 1), np.float32)
            base = np.zeros(most, np.float32)
            out = np.empty(lanes, np.float32)
            for c in range(runs):
                low, first = minima[y * runs + c], c * chunk
                used = min(chunk, width - first)
                # The chunk's pixels mix a few native columns of each level: weights[i, j] of mixed row sources[j].
                sources[0], found = offsets[levels], 1
                weights[:] = 0
                for i in range(used):
                    weights[i, 0] = 1
                    base[i] = gallery_norms[y * width + first + i] - spread[y * width + first + i]
                    for k in range(levels):
                        for t in range(2):
                            source, j = offsets[k] + cols[k, first + i, t], 0
                            while j < found and sources[j] != source:
                                j += 1
                            if j == found:
                                sources[j] = source
                                found += 1
                            weights[i, j] += col_weights[k, first + i, t]
                row = y * width + first
                whole = count - count % lanes
                for block in range(0, whole, lanes):
                    tiledot.tile(gallery, row, queries, start + block, mixed[:, block:], sources[:found],
                                 weights[:, :found], base, used, low, block)
                if whole < count:
                    tiledot.tile(gallery, row, queries, start + whole, mixed[:, whole:], sources[:found],
                                 weights[:, :found], base, used, out, 0)
                    low[whole:] = out[: count - whole]
                _tally(low, reach, y * runs + c, hits, smallest[numba.get_thread_id()])

    @compiled(parallel=True, **_FLAGS)
    def _amx_minima(gallery, gallery_norms, queries, query_norms, coarse, rows, row_weights, cols, col_weights,
                    widths, spread, start, chunk, reach, minima, hits, smallest):
        """:func:`_tiled_minima` with AMX: per chunk, :func:`anomaly.tiledot.amx_rows` multiplies its gallery rows
        with all the tile's queries into a small buffer that stays in cache, and :func:`_fold_pixel` forms the
        entries from it as :func:`_chunk_minima` does from a product written out, the queries' norms added."""
        digest  # noqa: B018 (a use, so that the loop closes over it: see _closing_over)
        count, levels, width = minima.shape[1], rows.shape[0], cols.shape[1]
        runs = (width + chunk - 1) // chunk
        offsets = _level_offsets(widths)
        padded = tiledot.amx_width(count)
        norms = query_norms[start : start + count]
        for y in numba.prange(rows.shape[1]):
            mixed = np.empty((offsets[levels], count), np.float32)
            _mix_down(coarse, rows, row_weights, y, start, offsets, mixed)
            products = np.empty((tiledot.ROWS, padded), np.float32)
            row = np.empty(count, np.float32)
            for c in range(runs):
                low, first = minima[y * runs + c], c * chunk
                tiledot.amx_rows(gallery, y * width + first, queries, start, count, products)
                low[:] = np.inf
                for x in range(first, min(first + chunk, width)):
                    g = y * width + x
                    _fold_pixel(low, row, products[x - first], norms, mixed, offsets, cols, col_weights, x,
                                gallery_norms[g] - spread[g])
                _tally(low, reach, y * runs + c, hits, smallest[numba.get_thread_id()])

    return _tiled_minima, _amx_minima


_tiled_minima, _amx_minima = _closing_over(tiledot.SOURCE_DIGEST)


@compiled(inline="always", **_FLAGS)
def _tally(low, reach, c, hits, smallest):
    """Count chunk c's minima within ``reach`` and fold them into ``smallest`` (one vectorised pass)."""
    count = np.int32(0)
    for p in range(low.shape[0]):
        count += np.int32(low[p] <= reach[p])
        smallest[p] = min(smallest[p], low[p])
    hits[c] = count


@compiled(**_FLAGS)
def _reach(within, offset, slack, roundoff):
    """The largest ranking distance whose lower end can be within ``within``, widened by far more than
    its own rounding (entries it lets through are tested on their lower end)."""
    grow = np.float32(1) + roundoff
    reach = np.empty(within.shape[0], np.float32)
    for p in range(within.shape[0]):
        reach[p] = (within[p] * grow + offset[p] + slack[p]
                    + np.float32(1e-6) * (abs(within[p]) * grow + abs(offset[p]) + slack[p]))
    return reach


@compiled(inline="always", **_FLAGS)
def _level_offsets(widths):
    """Where each native level's columns start among the mixed rows of :func:`_mix_down`, then their total."""
    offsets = np.zeros(widths.shape[0] + 1, np.int64)
    for k in range(widths.shape[0]):
        offsets[k + 1] = offsets[k] + widths[k]
    return offsets


@compiled(inline="always", **_FLAGS)
def _mix_down(coarse, rows, row_weights, y, start, offsets, out):
    """Gallery row y's native rows of every level k, mixed down from two coarse rows each, over the query
    columns from ``start``: ``out[offsets[k] + j] = a0 * coarse[rows[k, y, 0] + j] + a1 * coarse[rows[k, y, 1] + j]``
    with (a0, a1) = ``row_weights[k, y]``."""
    count = out.shape[1]
    for k in range(rows.shape[0]):
        a0, a1 = row_weights[k, y, 0], row_weights[k, y, 1]
        for j in range(offsets[k + 1] - offsets[k]):
            upper = coarse[rows[k, y, 0] + j, start : start + count]
            lower = coarse[rows[k, y, 1] + j, start : start + count]
            target = out[offsets[k] + j]
            for p in range(count):
                target[p] = a0 * upper[p] + a1 * lower[p]


@compiled(parallel=True, **_FLAGS)
def _screen(product, coarse, rows, row_weights, cols, col_weights, widths, spread, start, chunk, minima, hits, kth,
            within, offset, slack, roundoff, exact_slack, query_rows, gallery_rows):
    """Lower ``within``, then scan the chunks with hits for minima that pass (about one chunk per query,
    so 64 queries at a time are first counted), and form their entries, a chunk's in turn (on the
    thread team where there are many), kept in the order of the scan."""
    count = minima.shape[1]
    shrink = np.float32(1) - roundoff
    for p in range(count):
        within[p] = min(within[p], (kth[p] - offset[p] + slack[p]) / shrink)
    reach = _reach(within, offset, slack, roundoff)
    flat = np.empty(minima.size, np.int64)  # only the passing part is ever touched
    passed = 0
    blocks = count - count % 64
    for c in range(minima.shape[0]):
        if hits[c] == 0:
            continue
        row = minima[c]
        for first in range(0, blocks, 64):
            hits_here = np.int32(0)  # a fixed-length count: one vector comparison per 16 queries
            for j in range(64):
                hits_here += np.int32(row[first + j] <= reach[first + j])
            if hits_here:
                for p in range(first, first + 64):
                    if row[p] <= reach[p]:
                        flat[passed] = c * count + p
                        passed += 1
        for p in range(blocks, count):
            if row[p] <= reach[p]:
                flat[passed] = c * count + p
                passed += 1
    # Each passing (chunk, query) writes its entries into its own slots, then they close up.
    lower, upper = np.empty(passed * chunk, np.float32), np.empty(passed * chunk, np.float32)
    columns, pixels = np.empty(passed * chunk, np.int64), np.empty(passed * chunk, np.int64)
    kept = np.empty(passed, np.int64)
    if passed < _PARALLEL_PAIRS:
        for i in range(passed):
            kept[i] = _pair_entries(product, coarse, rows, row_weights, cols, col_weights, spread, start, chunk,
                                    flat[i], within, reach, offset, slack, roundoff, exact_slack, query_rows,
                                    gallery_rows, lower, upper, columns, pixels, i * chunk)
    else:
        for i in numba.prange(passed):
            kept[i] = _pair_entries(product, coarse, rows, row_weights, cols, col_weights, spread, start, chunk,
                                    flat[i], within, reach, offset, slack, roundoff, exact_slack, query_rows,
                                    gallery_rows, lower, upper, columns, pixels, i * chunk)
    found = 0
    for i in range(passed):
        for j in range(i * chunk, i * chunk + kept[i]):
            lower[found], upper[found], columns[found], pixels[found] = lower[j], upper[j], columns[j], pixels[j]
            found += 1
    return lower[:found], upper[:found], columns[:found], pixels[:found]


# Below this many passing (chunk, query) pairs, screen forms their entries on one thread: starting the
# team would cost more.
_PARALLEL_PAIRS = 64


@compiled(inline="always", **_FLAGS)
def _pair_entries(product, coarse, rows, row_weights, cols, col_weights, spread, start, chunk, pair, within, reach,
                  offset, slack, roundoff, exact_slack, query_rows, gallery_rows, lower, upper, columns, pixels,
                  slot):
    """The entries of one passing (chunk, query) ``pair`` (chunk * P_t + query column) whose lower end is
    within their query's bound, written from ``slot`` on; returns how many."""
    count, width = within.shape[0], cols.shape[1]
    grow, shrink = np.float32(1) + roundoff, np.float32(1) - roundoff
    runs = (width + chunk - 1) // chunk
    c, p = pair // count, pair % count
    y, first = c // runs, (c % runs) * chunk
    found = slot
    for x in range(first, min(first + chunk, width)):
        g = y * width + x
        # With exact rows, entries are formed again with the finest grid exact: those of a product that was
        # written out where they come within reach; all of a TiledProduct's (forming its entry costs about as
        # much). They are then bracketed by the exact slack alone.
        formed = product.shape[0] == 0
        if not formed:
            value = _entry(_widen(product[g, p]), coarse, rows, row_weights, cols, col_weights, spread, y, x, g,
                           start + p)
            formed = query_rows.shape[1] > 0 and value <= reach[p]
        if formed:
            value = _entry(_squared_distance(query_rows[start + p], gallery_rows[g]), coarse, rows, row_weights, cols,
                           col_weights, spread, y, x, g, start + p)
        if value <= reach[p]:
            if formed:
                low, high = value - offset[p] - exact_slack[p], value - offset[p] + exact_slack[p]
            else:
                low, high = (value - offset[p] - slack[p]) / grow, (value - offset[p] + slack[p]) / shrink
            if low <= within[p]:
                lower[found], upper[found] = low, high
                columns[found], pixels[found] = p, g
                found += 1
    return found - slot


@compiled(inline="always", **_FLAGS)
def _entry(base, coarse, rows, row_weights, cols, col_weights, spread, y, x, g, q):
    """``base`` plus the native levels' mixed products at gallery pixel g = (y, x) and query column q,
    level by level, less the spread: the sums of :func:`_chunk_minima` in its order."""
    value = base
    for k in range(rows.shape[0]):
        a0, a1, b0, b1 = row_weights[k, y, 0], row_weights[k, y, 1], col_weights[k, x, 0], col_weights[k, x, 1]
        top, bottom = rows[k, y, 0], rows[k, y, 1]
        m0 = a0 * coarse[top + cols[k, x, 0], q] + a1 * coarse[bottom + cols[k, x, 0], q]
        m1 = a0 * coarse[top + cols[k, x, 1], q] + a1 * coarse[bottom + cols[k, x, 1], q]
        value = value + (b0 * m0 + b1 * m1)
    return value - spread[g]


@compiled(fastmath={"reassoc", "contract"}, **_FLAGS)
def _squared_distance(query, gallery):
    """sum((query - gallery)^2) over the query's columns, in float32, summed in whatever order
    vectorises (nothing needs its exact bits: the tolerances cover float32 sums in any order)."""
    total = np.float32(0)
    for c in range(query.shape[0]):
        gap = query[c] - gallery[c]
        total += gap * gap
    return total


@compiled(**_FLAGS)
def _by_query(query, count):
    """A counting sort: entry indices grouped by query, in arrival order, and each query's start (count + 1,)."""
    starts = np.zeros(count + 1, np.int64)
    for i in range(query.shape[0]):
        starts[query[i] + 1] += 1
    for p in range(count):
        starts[p + 1] += starts[p]
    fill = starts[:-1].copy()
    order = np.empty(query.shape[0], np.int64)
    for i in range(query.shape[0]):
        order[fill[query[i]]] = i
        fill[query[i]] += 1
    return order, starts


@compiled(**_FLAGS)
def _prune(lower, upper, query, within, kappa, cap):
    order, starts = _by_query(query, within.shape[0])
    keep = np.empty(query.shape[0], np.int64)
    kept = 0
    for p in range(within.shape[0]):
        group = order[starts[p] : starts[p + 1]]
        if kappa == 1:  # the common case, without a heap
            for i in group:
                within[p] = min(within[p], upper[i])
        elif group.shape[0] >= kappa:
            within[p] = min(within[p], upper[_smallest_entries(upper, group, kappa)[kappa - 1]])
        if group.shape[0] > cap:
            group = _smallest_entries(upper, group, cap)
        for i in group:
            if lower[i] <= within[p]:
                keep[kept] = i
                kept += 1
    return keep[:kept]


@compiled(**_FLAGS)
def _smallest(values, query, count, kappa):
    out = np.full((count, kappa), np.inf, np.float32)
    order, starts = _by_query(query, count)
    for p in range(count):
        best = _smallest_entries(values, order[starts[p] : starts[p + 1]], kappa)
        for j in range(best.shape[0]):
            out[p, j] = values[best[j]]
    return out


@compiled(**_FLAGS)
def _smallest_entries(values, group, k):
    """The entries of ``group`` with the k smallest ``values`` (all of them where it has fewer), ascending,
    equal values in their order in ``group``. A max-heap of k: O(n log k), and it compiles in a tenth
    of the time numba's np.partition and sorts take (seconds, on a first run)."""
    size = min(k, group.shape[0])
    heap = np.empty(size, np.int64)  # positions in group, the largest (value, position) at the root
    for n in range(size):
        heap[n] = n
        child = n
        while child > 0 and _later(values, group, heap[child], heap[(child - 1) // 2]):
            parent = (child - 1) // 2
            heap[child], heap[parent] = heap[parent], heap[child]
            child = parent
    for n in range(size, group.shape[0]):
        if values[group[n]] < values[group[heap[0]]]:  # equal: the earlier one stays
            heap[0] = n
            _sift_down(values, group, heap, size)
    for end in range(size - 1, 0, -1):  # heapsort: the largest goes last
        heap[0], heap[end] = heap[end], heap[0]
        _sift_down(values, group, heap, end)
    return group[heap]


@compiled(inline="always", **_FLAGS)
def _later(values, group, a, b):
    """Whether position a of ``group`` ranks after position b: a larger value, or equal and later."""
    return values[group[a]] > values[group[b]] or (values[group[a]] == values[group[b]] and a > b)


@compiled(inline="always", **_FLAGS)
def _sift_down(values, group, heap, size):
    """Restore the max-heap ``heap[:size]`` after its root changed."""
    parent = 0
    while 2 * parent + 1 < size:
        child = 2 * parent + 1
        if child + 1 < size and _later(values, group, heap[child + 1], heap[child]):
            child += 1
        if not _later(values, group, heap[child], heap[parent]):
            return
        heap[child], heap[parent] = heap[parent], heap[child]
        parent = child


_HALF = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
"""Every float16 bit pattern as float32 (exact): the loops read float16 levels through it."""


def _value(value, half):
    """A level entry as float32: float16 bits (uint16) through ``half``, float32 as it is."""


@overload(_value)
def _value_typed(value, half):
    if isinstance(value, types.Integer):
        return lambda value, half: half[value]
    return lambda value, half: value


@compiled(inline="always", **_FLAGS)
def _mixed(level, half, r0, r1, c0, c1, a0, a1, b0, b1, c):
    """Channel c of a pixel mixed from four taps, across then down in float32 (``F.interpolate``'s order)."""
    top = b0 * _value(level[r0, c0, c], half) + b1 * _value(level[r0, c1, c], half)
    bottom = b0 * _value(level[r1, c0, c], half) + b1 * _value(level[r1, c1, c], half)
    return a0 * top + a1 * bottom


@compiled(parallel=True, **_FLAGS)
def _add_level_distances(queries, column, query_ids, pixels, width, level, half, interpolate, first_y, second_y,
                         weight_first_y, weight_second_y, first_x, second_x, weight_first_x, weight_second_x, out):
    channels = level.shape[2]
    for m in numba.prange(pixels.shape[0]):
        y, x = pixels[m] // width, pixels[m] % width
        q = queries[query_ids[m]]
        total = np.float32(0)
        if interpolate:
            r0, r1, c0, c1 = first_y[y], second_y[y], first_x[x], second_x[x]
            a0, a1, b0, b1 = weight_first_y[y], weight_second_y[y], weight_first_x[x], weight_second_x[x]
            for c in range(channels):
                gap = q[column + c] - _mixed(level, half, r0, r1, c0, c1, a0, a1, b0, b1, c)
                total += gap * gap
        else:
            for c in range(channels):
                gap = q[column + c] - _value(level[y, x, c], half)
                total += gap * gap
        out[m] += total


@compiled(parallel=True, **_FLAGS)
def _centred_rows(level, half, center, interpolate, first_y, second_y, weight_first_y, weight_second_y, first_x,
                  second_x, weight_first_x, weight_second_x, width, column, out, norms):
    channels = level.shape[2]
    for m in numba.prange(out.shape[0]):
        y, x = m // width, m % width
        total = np.float32(0)
        if interpolate:
            r0, r1, c0, c1 = first_y[y], second_y[y], first_x[x], second_x[x]
            a0, a1, b0, b1 = weight_first_y[y], weight_second_y[y], weight_first_x[x], weight_second_x[x]
            for c in range(channels):
                value = _mixed(level, half, r0, r1, c0, c1, a0, a1, b0, b1, c) - center[c]
                out[m, column + c] = value
                total += value * value
        else:
            for c in range(channels):
                value = _value(level[y, x, c], half) - center[c]
                out[m, column + c] = value
                total += value * value
        norms[m] += total


@compiled(**_FLAGS)
def _row_norms(rows, columns):
    norms = np.zeros(rows.shape[0], np.float32)
    for m in range(rows.shape[0]):
        for c in range(columns):
            norms[m] += rows[m, c] * rows[m, c]
    return norms


@compiled(**_FLAGS)
def _norm_columns(norms, split, column, out):
    for m in range(out.shape[0]):
        hi = _round_bfloat16(norms[m]) if split else norms[m]
        out[m, column], out[m, column + 1], out[m, column + 2], out[m, column + 3] = 1, 1, hi, norms[m] - hi


@compiled(inline="always", **_FLAGS)
def _round_bfloat16(value):
    """A float32 rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = _bits_from_float(value)
    return _float_from_bits((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
                            & np.uint32(0xFFFF0000))


@compiled(parallel=True, **_FLAGS)
def _mix_spread(level, half, first_y, second_y, weight_first_y, weight_second_y, first_x, second_x, weight_first_x,
                weight_second_x, width, out):
    h, w, channels = level.shape
    # Squared gaps from each native pixel to its right, lower, lower-right neighbours, and from its
    # right neighbour to its lower one (entries past the border are never weighted).
    across, down = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    diagonal, anti = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
    for y in numba.prange(h):
        for x in range(w):
            for c in range(channels):
                here = _value(level[y, x, c], half)
                if x + 1 < w:
                    gap = here - _value(level[y, x + 1, c], half)
                    across[y, x] += gap * gap
                if y + 1 < h:
                    gap = here - _value(level[y + 1, x, c], half)
                    down[y, x] += gap * gap
                if x + 1 < w and y + 1 < h:
                    gap = here - _value(level[y + 1, x + 1, c], half)
                    diagonal[y, x] += gap * gap
                    gap = _value(level[y, x + 1, c], half) - _value(level[y + 1, x, c], half)
                    anti[y, x] += gap * gap
    for m in numba.prange(out.shape[0]):
        y, x = m // width, m % width
        r0, r1, c0, c1 = first_y[y], second_y[y], first_x[x], second_x[x]
        a0, a1, b0, b1 = weight_first_y[y], weight_second_y[y], weight_first_x[x], weight_second_x[x]
        out[m] = (b0 * b1 * (a0 * a0 * across[r0, c0] + a1 * a1 * across[r1, c0])
                  + a0 * a1 * (b0 * b0 * down[r0, c0] + b1 * b1 * down[r0, c1])
                  + a0 * a1 * b0 * b1 * (diagonal[r0, c0] + anti[r0, c0]))


@compiled(parallel=True, **_FLAGS)
def _mix_rows(source, first, second, weight_first, weight_second, out):
    for r in numba.prange(source.shape[0]):
        for i in range(out.shape[1]):
            a, b = source[r, first[i]], source[r, second[i]]
            wa, wb = weight_first[i], weight_second[i]
            target = out[r, i]
            for x in range(out.shape[2]):
                target[x] = wa * a[x] + wb * b[x]
