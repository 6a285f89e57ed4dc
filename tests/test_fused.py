"""The compiled loops of the pixel search against numpy and torch on small cases."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly import fused, search, tiledot
from anomaly.features import stack_pyramid


def random_terms(rng, size: tuple[int, int], grids: tuple[tuple[int, int], ...], queries: int) -> fused.Terms:
    rows = sum(h * w for h, w in grids)
    coarse = rng.normal(size=(rows, queries)).astype(np.float32)
    return fused.Terms(coarse, *search._native_taps(grids, size), rng.random(size[0] * size[1]).astype(np.float32))


def reference(product: torch.Tensor, terms: fused.Terms, start: int, grids: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(G, P_t) ranking distances in float64: each native level's coarse products upsampled over the
    gallery grid by F.interpolate, independently of the loops' tap tables."""
    height, width = terms.rows.shape[1], terms.cols.shape[1]
    columns = slice(start, start + product.shape[1])
    out = product.double().numpy() - terms.spread.astype(np.float64)[:, None]
    base = 0
    for h, w in grids:
        native = torch.from_numpy(terms.coarse[base : base + h * w, columns].astype(np.float64))
        upsampled = F.interpolate(native.T.reshape(1, -1, h, w), size=(height, width), mode="bilinear",
                                  align_corners=False)
        out += upsampled.reshape(-1, height * width).T.numpy()
        base += h * w
    return out


def chunked(values: np.ndarray, width: int, chunk: int) -> np.ndarray:
    """Minima over runs of up to ``chunk`` pixels of each grid row, row by row."""
    rows = values.reshape(-1, width, values.shape[1])
    return np.stack([rows[:, k : k + chunk].min(1) for k in range(0, width, chunk)], 1).reshape(-1, values.shape[1])


EXACT = fused.Tolerance(np.zeros(40, np.float32), np.zeros(40, np.float32), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grids", [(), ((5, 4),), ((5, 4), (3, 2))])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunk_minima_and_screened_entries_match_numpy(dtype, grids, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(0)
    size, queries, start, chunk = (9, 11), 40, 11, 4  # rows of 11 pixels: each row's last chunk is short
    terms = random_terms(rng, size, grids, queries)
    product = torch.from_numpy(rng.normal(size=(99, 23)).astype(np.float32)).to(dtype)
    want = reference(product, terms, start, grids)

    infinite = torch.full((23,), np.inf)
    minima = fused.chunk_minima(product, terms, start, chunk, infinite, EXACT)
    assert minima.values.shape == (9 * 3, 23)
    np.testing.assert_allclose(minima.values.numpy(), chunked(want, 11, chunk), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(minima.smallest.numpy(), minima.values.amin(0).numpy())
    np.testing.assert_array_equal(minima.hits, 23)

    # Nothing known yet: every entry comes back, as the same float32 sums.
    lower, upper, columns, rows = fused.screen(product, terms, start, chunk, minima, infinite, infinite.clone(), EXACT)
    assert len(lower) == want.size
    np.testing.assert_array_equal(lower.numpy(), upper.numpy())
    np.testing.assert_allclose(lower.numpy(), want[rows.numpy(), columns.numpy()], rtol=1e-6, atol=1e-5)
    dense = np.full(want.shape, np.nan, np.float32)
    dense[rows.numpy(), columns.numpy()] = lower.numpy()
    np.testing.assert_array_equal(chunked(dense, 11, chunk), minima.values.numpy())

    # A finite bound keeps exactly the entries within it, from the chunks whose minimum is (the
    # minima count them, and the screen reads only the chunks with any).
    within = torch.from_numpy(np.quantile(dense, 0.03, axis=0).astype(np.float32))
    minima = fused.chunk_minima(product, terms, start, chunk, within, EXACT)
    reach = within.numpy() * np.float32(1 + 1e-6)
    np.testing.assert_array_equal(minima.hits, (minima.values.numpy() <= reach).sum(1))
    assert 0 < (minima.hits == 0).sum() < len(minima.hits)
    lower, _, columns, _ = fused.screen(product, terms, start, chunk, minima, infinite, within, EXACT)
    assert (lower.numpy() <= within.numpy()[columns.numpy()]).all()
    assert len(lower) == int((dense <= within.numpy()).sum())

    # The least chunk minimum's upper end lowers the bound in place: each query keeps its nearest entry.
    # None takes the minimum the minima found.
    minima = fused.chunk_minima(product, terms, start, chunk, infinite, EXACT)
    for kth in (minima.values.amin(0), None):
        within = infinite.clone()
        lower, _, columns, _ = fused.screen(product, terms, start, chunk, minima, kth, within, EXACT)
        np.testing.assert_array_equal(within.numpy(), dense.min(0))
        assert sorted(set(columns.tolist())) == list(range(23))


def test_screen_brackets_each_entry_by_its_tolerance():
    """Lower and upper ends are (r - offset -+ slack) / (1 +- roundoff); an entry stays while its
    lower end is within the bound, lowered first to the upper end of ``kth``."""
    rng = np.random.default_rng(4)
    terms = random_terms(rng, (9, 7), ((5, 4),), 40)
    product = torch.from_numpy(rng.normal(size=(63, 23)).astype(np.float32))
    ranking = reference(product, terms, 0, ((5, 4),))
    tolerance = fused.Tolerance(rng.random(23).astype(np.float32), rng.random(23).astype(np.float32) * 0.1, 2.0**-9)
    within = torch.full((23,), np.inf)
    minima = fused.chunk_minima(product, terms, 0, 8, within, tolerance)
    kth = minima.values.topk(2, dim=0, largest=False).values[-1]
    lower, upper, columns, rows = fused.screen(product, terms, 0, 8, minima, kth, within, tolerance)

    offset, slack, u = tolerance.offset.astype(np.float64), tolerance.slack.astype(np.float64), tolerance.roundoff
    np.testing.assert_allclose(within.numpy(), (kth.numpy() - offset + slack) / (1 - u), rtol=1e-6)
    want_lower = (ranking - offset - slack) / (1 + u)
    kept = want_lower <= within.numpy()
    assert len(lower) == int(kept.sum())
    assert kept[rows.numpy(), columns.numpy()].all()
    np.testing.assert_allclose(lower.numpy(), want_lower[rows.numpy(), columns.numpy()], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upper.numpy(), ((ranking - offset + slack) / (1 - u))[rows.numpy(), columns.numpy()],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grids", [(), ((5, 4),)])
def test_screen_makes_a_bounded_product_exact(grids):
    """With ``exact`` rows the product is only a lower bound of the finest-grid distances: the entries
    that pass are formed again from sum((q - g)^2) over the query's columns (the gallery rows' last
    four, norm columns, are not read), and exactly those within the bound come back."""
    rng = np.random.default_rng(6)
    size, start, chunk = (9, 11), 11, 4
    terms = random_terms(rng, size, grids, 40)
    query_rows = rng.normal(size=(40, 5)).astype(np.float32)
    gallery_rows = np.concatenate([rng.normal(size=(99, 5)), np.full((99, 4), 1e6)], 1).astype(np.float32)
    direct = ((gallery_rows[:, None, :5].astype(np.float64) - query_rows[None, start : start + 23]) ** 2).sum(-1)
    want = reference(torch.from_numpy(direct), terms, start, grids)
    bound = torch.from_numpy((direct * rng.uniform(0.3, 1.0, direct.shape)).astype(np.float32))
    exact = (query_rows, gallery_rows)

    infinite = torch.full((23,), np.inf)
    minima = fused.chunk_minima(bound, terms, start, chunk, infinite, EXACT)
    lower, upper, columns, rows = fused.screen(bound, terms, start, chunk, minima, infinite, infinite.clone(), EXACT,
                                               exact)
    assert len(lower) == want.size
    np.testing.assert_allclose(lower.numpy(), want[rows.numpy(), columns.numpy()], rtol=1e-5, atol=1e-5)

    within = torch.from_numpy(np.quantile(want, 0.05, axis=0).astype(np.float32))
    minima = fused.chunk_minima(bound, terms, start, chunk, within, EXACT)
    lower, _, columns, rows = fused.screen(bound, terms, start, chunk, minima, infinite, within.clone(), EXACT, exact)
    kept = want <= within.numpy()
    assert len(lower) == int(kept.sum()) > 0
    assert kept[rows.numpy(), columns.numpy()].all()


def test_entries_formed_from_exact_rows_are_bracketed_by_the_exact_slack():
    """A bfloat16 product written out is only near the finest-grid distances; given the exact rows, the
    screen forms the entries that pass again and brackets them by the exact slack alone (float32's, far
    tighter than bfloat16's), so exactly those whose exact lower end is within the bound come back."""
    rng = np.random.default_rng(9)
    size, grids, start, chunk, count = (9, 11), ((5, 4),), 11, 8, 23
    terms = random_terms(rng, size, grids, 40)
    query_rows = rng.normal(size=(40, 5)).astype(np.float32)
    gallery_rows = np.concatenate([rng.normal(size=(99, 5)), np.full((99, 4), 1e6)], 1).astype(np.float32)
    direct = ((gallery_rows[:, None, :5].astype(np.float64) - query_rows[None, start : start + count]) ** 2).sum(-1)
    want = reference(torch.from_numpy(direct), terms, start, grids)
    product = torch.from_numpy(direct).bfloat16()  # rounded: within 2^-8 of each distance
    offset = rng.random(count).astype(np.float32)
    tolerance = fused.Tolerance(offset, np.full(count, 0.5, np.float32), 2.0**-9, np.full(count, 1e-3, np.float32))
    infinite = torch.full((count,), np.inf)
    within = torch.from_numpy(np.quantile(want - offset, 0.1, axis=0).astype(np.float32))
    minima = fused.chunk_minima(product, terms, start, chunk, within, tolerance)
    lower, upper, columns, rows = fused.screen(product, terms, start, chunk, minima, infinite, within.clone(),
                                               tolerance, (query_rows, gallery_rows))
    exact = (want - offset)[rows.numpy(), columns.numpy()]
    np.testing.assert_allclose(lower.numpy(), exact - 1e-3, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upper.numpy(), exact + 1e-3, rtol=1e-5, atol=1e-5)
    kept = want - offset - 1e-3 <= within.numpy()
    assert len(lower) == int(kept.sum()) > 0
    assert kept[rows.numpy(), columns.numpy()].all()


def tile_paths() -> list:
    """Every way this CPU can form a tile: bfloat16 with AMX, bfloat16 pairs on AVX512-BF16 (where AMX is
    there too, with AMX turned off), float32 on AVX-512 or AVX2."""
    amx = tiledot.instructions(torch.bfloat16) == "AMX-BF16"
    return [pytest.param((torch.bfloat16, True), marks=pytest.mark.skipif(not amx, reason="no AMX"), id="bfloat16-amx"),
            *(pytest.param((dtype, False), id=str(dtype).removeprefix("torch."),
                           marks=pytest.mark.skipif(not tiledot.supported(dtype), reason=f"no {dtype} tiles"))
              for dtype in (torch.bfloat16, torch.float32))]


@pytest.fixture(params=tile_paths())
def tile_path(request, monkeypatch):
    """(dtype, whether AMX forms bfloat16 products of up to 16 pairs), the AMX loop's calls counted."""
    dtype, amx = request.param
    if not amx:
        monkeypatch.setattr(tiledot, "_amx_permitted", lambda: False)
    tiledot.instructions.cache_clear()
    calls, loop = [], fused._amx_minima

    def counted(*args):
        calls.append(args[0].shape[1])
        return loop(*args)

    monkeypatch.setattr(fused, "_amx_minima", counted)
    yield dtype, amx, calls
    tiledot.instructions.cache_clear()


def tiled_product(rng, gallery: int, queries: int, columns: int, count: int, dtype: torch.dtype
                 ) -> tuple[fused.TiledProduct, torch.Tensor]:
    """A TiledProduct of random operands in ``dtype`` and float32 norms, and the same entries (G, count) in
    float64, for queries from 11."""
    left = torch.from_numpy(rng.normal(size=(gallery, columns)).astype(np.float32)).to(dtype)
    right = torch.from_numpy(rng.normal(size=(queries, columns)).astype(np.float32)).to(dtype)
    left_norms, right_norms = (rng.random(n).astype(np.float32) * 10 for n in (gallery, queries + tiledot.LANES))
    product = fused.TiledProduct(tiledot.pack_rows(left, tiledot.ROWS), left_norms, tiledot.pack_columns(right),
                                right_norms, count)
    written = left.double() @ right[11 : 11 + count].double().T
    return product, written + torch.from_numpy(left_norms[:, None] + right_norms[None, 11 : 11 + count]).double()


@pytest.mark.parametrize("columns", [1, 6, 28, 33])  # odd counts: a zero column completes the last bfloat16 pair;
# 28: the bound's; 33: more pairs than AMX multiplies at once
@pytest.mark.parametrize("count", [23, 70])  # fewer queries than a tile, and two tiles and a part
@pytest.mark.parametrize("grids", [(), ((5, 4), (3, 2))])
@pytest.mark.parametrize("threads", [1, 2])
def test_pair_product_minima_match_numpy(tile_path, columns, count, grids, threads, monkeypatch):
    """The minima of a product formed tile by tile in registers (bfloat16 with AMX, or pairs on AVX512-BF16,
    float32 columns on AVX-512 or AVX2) are those of the product written out, up to float32 rounding; so are
    the hits and each query's least minimum."""
    dtype, amx, amx_calls = tile_path
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = np.random.default_rng(columns)
    size, chunk = (9, 11), 8  # each row's last chunk is short
    terms = random_terms(rng, size, grids, 90)
    product, written = tiled_product(rng, 99, 90, columns, count, dtype)
    assert product.shape == (99, count)
    want = chunked(reference(written, terms, 11, grids), 11, chunk)

    infinite = torch.full((count,), np.inf)
    exact = fused.Tolerance(np.zeros(count, np.float32), np.zeros(count, np.float32), 0.0)
    minima = fused.chunk_minima(product, terms, 11, chunk, infinite, exact)
    np.testing.assert_allclose(minima.values.numpy(), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(minima.smallest.numpy(), minima.values.amin(0).numpy())
    within = torch.from_numpy(np.quantile(want, 0.1, axis=0).astype(np.float32))
    minima = fused.chunk_minima(product, terms, 11, chunk, within, exact)
    reach = within.numpy() * np.float32(1 + 1e-6)
    np.testing.assert_array_equal(minima.hits, (minima.values.numpy() <= reach).sum(1))
    with pytest.raises(ValueError, match="at most 8 pixels"):
        fused.chunk_minima(product, terms, 11, tiledot.ROWS + 1, within, exact)
    assert len(amx_calls) == (2 if amx and columns <= 2 * tiledot.AMX_PAIRS else 0)


def test_screen_forms_every_entry_of_a_pair_product_exactly(tile_path):
    """A TiledProduct is a bound never written out: every entry of a chunk that passes is formed from the
    exact rows, and exactly those within the bound come back."""
    dtype = tile_path[0]
    rng = np.random.default_rng(8)
    size, grids, chunk, count = (9, 11), ((5, 4),), 8, 23
    terms = random_terms(rng, size, grids, 40)
    query_rows = rng.normal(size=(40, 5)).astype(np.float32)
    gallery_rows = np.concatenate([rng.normal(size=(99, 5)), np.full((99, 4), 1e6)], 1).astype(np.float32)
    direct = ((gallery_rows[:, None, :5].astype(np.float64) - query_rows[None, 11 : 11 + count]) ** 2).sum(-1)
    want = reference(torch.from_numpy(direct), terms, 11, grids)
    # A loose lower bound: a quarter of the distance over the first two columns.
    near, far = torch.from_numpy(gallery_rows[:, :2] / 2), torch.from_numpy(query_rows[:, :2] / 2)
    bound = fused.TiledProduct(tiledot.pack_rows(near.to(dtype), tiledot.ROWS), near.pow(2).sum(1).numpy(),
                              tiledot.pack_columns((-2 * far).to(dtype)),
                              np.pad(far.pow(2).sum(1).numpy(), (0, tiledot.LANES)), count)
    exact = (query_rows, gallery_rows)

    infinite = torch.full((count,), np.inf)
    minima = fused.chunk_minima(bound, terms, 11, chunk, infinite, EXACT)
    lower, _, columns, rows = fused.screen(bound, terms, 11, chunk, minima, infinite, infinite.clone(), EXACT, exact)
    assert len(lower) == want.size
    np.testing.assert_allclose(lower.numpy(), want[rows.numpy(), columns.numpy()], rtol=1e-5, atol=1e-5)

    within = torch.from_numpy(np.quantile(want, 0.05, axis=0).astype(np.float32))
    minima = fused.chunk_minima(bound, terms, 11, chunk, torch.full((count,), 1e30), EXACT)
    lower, _, columns, rows = fused.screen(bound, terms, 11, chunk, minima, infinite, within.clone(), EXACT, exact)
    kept = want <= within.numpy()
    assert len(lower) == int(kept.sum()) > 0
    assert kept[rows.numpy(), columns.numpy()].all()


def test_pair_products_only_where_llvm_can_emit_them(monkeypatch):
    """LLVM cannot emit VDPBF16PS for a CPU without AVX512-BF16 (nor name its operands before LLVM 17), and
    float32 tiles need vector fused multiply-adds: a numba told to compile for another CPU, or an old LLVM,
    turns TiledProducts off. The search says which it uses. AMX needs Linux's permission as well."""
    amx = "AMX-BF16" if tiledot._amx_permitted() else "AVX512-BF16"
    try:
        monkeypatch.setattr(tiledot.numba.config, "CPU_NAME", "generic")
        for features, bfloat16, float32 in [("", None, None), ("+avx2", None, None), ("+avx2,+fma", None, "AVX2"),
                                            ("+avx512f", None, "AVX-512"),
                                            ("+avx2,+fma,+avx512f,+avx512bf16", "AVX512-BF16", "AVX-512"),
                                            ("+avx2,+fma,+avx512f,+avx512bf16,+amx-tile,+amx-bf16", amx, "AVX-512")]:
            monkeypatch.setattr(tiledot.numba.config, "CPU_FEATURES", features)
            tiledot.instructions.cache_clear()
            assert (tiledot.instructions(torch.bfloat16), tiledot.instructions(torch.float32)) == (bfloat16, float32)
            assert (tiledot.supported(torch.bfloat16), tiledot.supported(torch.float32)) == (bool(bfloat16), bool(float32))
            assert search.describe("fp32") == ("fp32 ranking, its bound " + (
                f"formed in registers ({float32})" if float32 else "multiplied and written out"))
        monkeypatch.setattr(tiledot.llvmlite.binding, "llvm_version_info", (16, 0, 0))
        tiledot.instructions.cache_clear()
        assert not tiledot.supported(torch.bfloat16)
        assert search.describe("bf16") == "bf16 ranking, its bound multiplied and written out"
        assert tiledot.supported(torch.float32)
    finally:
        monkeypatch.undo()
        tiledot.instructions.cache_clear()


def test_float32_tiles_on_avx2(tmp_path):
    """Most laptops have AVX2 and no AVX-512: there a float32 tile is formed in 8-lane blocks of 4 rows.
    The tile tests above, run again in a numba compiling for such a CPU (Haswell), must pass, not skip."""
    if not (tiledot._has("avx2") and tiledot._has("fma")):
        pytest.skip("this CPU cannot run code compiled for AVX2")
    env = {**os.environ, **tiledot.AVX2_ONLY, "NUMBA_CACHE_DIR": str(tmp_path)}
    tests = "float32 and (minima_match_numpy or every_entry_of_a_pair_product)"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and " 33 passed" in f" {summary}", summary


@pytest.mark.skipif(tiledot.instructions(torch.bfloat16) != "AMX-BF16", reason="no AMX")
@pytest.mark.parametrize("pairs", [1, 7, 14, 16])
@pytest.mark.parametrize(("row", "column", "count"), [(0, 0, 70), (5, 3, 33), (91, 60, 10), (0, 69, 1)])
def test_amx_rows_are_the_products_of_the_bfloat16_rows(pairs, row, column, count):
    """Every entry AMX writes, two tiles of 16 queries at a time (the last round partly past ``count``, into
    the queries' zero padding), is the float64 product of the bfloat16 rows, to float32 rounding."""
    rng = np.random.default_rng(pairs)
    gallery = torch.from_numpy(rng.normal(size=(99, 2 * pairs)).astype(np.float32)).bfloat16()
    queries = torch.from_numpy(rng.normal(size=(70, 2 * pairs)).astype(np.float32)).bfloat16()
    width = tiledot.amx_width(count)
    out = np.full((tiledot.ROWS, width + 1), np.nan, np.float32)  # one column more: never written
    _amx_rows(tiledot.pack_rows(gallery, tiledot.ROWS), row, tiledot.pack_columns(queries), column, count, out)
    padded = torch.cat([queries, torch.zeros(tiledot.LANES, 2 * pairs, dtype=torch.bfloat16)])
    rows = torch.cat([gallery, torch.zeros(tiledot.ROWS, 2 * pairs, dtype=torch.bfloat16)])[row : row + tiledot.ROWS]
    want = rows.double() @ padded[column : column + width].double().T
    assert width % (2 * tiledot.AMX_COLUMNS) == 0 and width >= count
    np.testing.assert_allclose(out[:, :width], want.numpy(), rtol=0, atol=1e-5 * float(want.abs().max()))
    assert np.isnan(out[:, width]).all()


@numba.njit
def _amx_rows(gallery, row, queries, column, count, out):
    tiledot.amx_rows(gallery, row, queries, column, count, out)


def test_pack_rows_pairs_bfloat16_columns_and_keeps_float32_ones():
    """Column 2j in the low half (little-endian), 2j + 1 in the high; an odd count gets a zero column,
    and padding rows (pack_rows) or columns (pack_columns) are zero."""
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]).bfloat16()
    packed = tiledot.pack_rows(x, 3)
    assert packed.shape == (5, 2) and packed.dtype == np.int32
    halves = torch.from_numpy(packed.copy()).view(torch.bfloat16).float()
    np.testing.assert_array_equal(halves.numpy(), [[1, 2, 3, 0], [4, 5, 6, 0], [0] * 4, [0] * 4, [0] * 4])
    by_column = tiledot.pack_columns(x)
    assert by_column.shape == (2, 2 + tiledot.LANES)
    np.testing.assert_array_equal(by_column, tiledot.pack_rows(x, tiledot.LANES).T)
    rows = tiledot.pack_rows(x.float(), 3)  # float32: the rows as they are, one column each
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, [[1, 2, 3], [4, 5, 6], [0] * 3, [0] * 3, [0] * 3])


def test_bfloat16_products_are_widened_exactly():
    values = torch.tensor([[1.0, -2.5, 3.0e-3, 6.5e4, 0.0, -0.0, float("inf"), 1.0e-38]]).to(torch.bfloat16)
    terms = fused.Terms(np.zeros((0, 8), np.float32), *search._native_taps((), (1, 1)), np.zeros(1, np.float32))
    minima = fused.chunk_minima(values, terms, 0, 8, torch.full((8,), np.inf), EXACT)
    np.testing.assert_array_equal(minima.values.numpy(), values.float().numpy())


@pytest.mark.parametrize("kappa, cap", [(1, 256), (3, 256), (2, 4)])
def test_prune_keeps_what_can_still_be_among_the_kappa_nearest(kappa, cap):
    """Against a per-query numpy loop: ``within`` drops to the kappa-th smallest upper end, and an
    entry stays when its lower end is within it and it ranks (by upper end, ties by arrival) below cap."""
    rng = np.random.default_rng(7)
    queries, entries = 6, 60
    upper = rng.integers(0, 12, entries).astype(np.float32)  # many ties
    lower = upper - rng.integers(0, 4, entries).astype(np.float32)
    query = rng.integers(0, queries - 1, entries)  # the last query has no entries
    within = rng.integers(4, 12, queries).astype(np.float32)
    want_within, want_keep = within.copy(), []
    for p in range(queries):
        members = np.flatnonzero(query == p)
        if len(members) >= kappa:
            want_within[p] = min(want_within[p], np.sort(upper[members])[kappa - 1])
        ranked = members[np.argsort(upper[members], kind="stable")][:cap]
        want_keep += [i for i in ranked if lower[i] <= want_within[p]]

    got_within = torch.from_numpy(within.copy())
    keep = fused.prune(torch.from_numpy(lower), torch.from_numpy(upper), torch.from_numpy(query), got_within, kappa, cap)
    np.testing.assert_array_equal(got_within.numpy(), want_within)
    assert sorted(keep.tolist()) == sorted(want_keep)
    assert len(want_keep) < entries  # the case prunes something


def test_smallest_per_query_ascending_with_inf_where_fewer():
    rng = np.random.default_rng(8)
    values = rng.random(40).astype(np.float32)
    query = rng.integers(0, 5, 40)
    query[query == 3] = 4  # query 3 has none
    got = fused.smallest(torch.from_numpy(values), torch.from_numpy(query), 6, 4).numpy()
    for p in range(6):
        want = np.sort(values[query == p])[:4]
        np.testing.assert_array_equal(got[p, : len(want)], want)
        assert np.isinf(got[p, len(want) :]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [False, True])
def test_gallery_rows_are_the_centred_stacked_pixels_and_their_norms(dtype, split):
    """Rows [x, 1, 1, hi, lo] against float64 numpy on stack_pyramid's pixels (the coarse level is mixed
    from its taps, the finest read as it is); hi + lo is the squared norm, hi its bfloat16 rounding."""
    rng = np.random.default_rng(6)
    size = (9, 7)
    levels = [torch.from_numpy(rng.normal(size=(c, h, w)).astype(np.float32)).to(dtype)
              for c, (h, w) in [(3, size), (5, (4, 3))]]
    centers = [torch.from_numpy(rng.normal(size=level.shape[0]).astype(np.float32)) for level in levels]
    taps = [None, search._level_taps((4, 3), size)]
    rows, norms = fused.gallery_rows([level.permute(1, 2, 0).contiguous() for level in levels], centers, taps, size,
                                     split)

    stacked = stack_pyramid([level[None].double() for level in levels])[0].reshape(8, -1).T.numpy()
    want = stacked - torch.cat(centers).double().numpy()
    np.testing.assert_allclose(rows[:, :8].numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norms.numpy(), (want**2).sum(1), rtol=1e-5)
    np.testing.assert_array_equal(rows[:, 8:10].numpy(), 1.0)
    hi, lo = rows[:, 10], rows[:, 11]
    np.testing.assert_array_equal((hi + lo).numpy(), norms.numpy())
    np.testing.assert_array_equal(hi.numpy(), norms.to(torch.bfloat16).float().numpy() if split else norms.numpy())


@pytest.mark.parametrize("split", [False, True])
def test_norm_columns_filled_in_place_as_gallery_rows_forms_them(split):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 6)).astype(np.float32) * 3
    rows = torch.from_numpy(np.concatenate([x, np.full((50, 4), np.nan, np.float32)], 1))
    assert fused.fill_norm_columns(rows, split) is rows
    want, _ = fused.gallery_rows([torch.from_numpy(x)[None]], [torch.zeros(6)], [None], (1, 50), split)
    np.testing.assert_array_equal(rows.numpy(), want.numpy())


def test_norms_split_at_bfloat16_ties_round_to_even():
    """Squared norms exactly halfway between two bfloat16 values: 1 + 2^-8 rounds down to 1, and
    1 + 3 * 2^-8 up to 1 + 2^-6, as torch rounds them."""
    pixels = torch.tensor([[[1.0, 2**-4, 0.0, 0.0], [1.0, 2**-4, 2**-4, 2**-4]]])  # (1, 2, 4)
    rows, norms = fused.gallery_rows([pixels], [torch.zeros(4)], [None], (1, 2), split=True)
    np.testing.assert_array_equal(norms.numpy(), [1 + 2**-8, 1 + 3 * 2**-8])
    np.testing.assert_array_equal(rows[:, 6].numpy(), [1.0, 1 + 2**-6])
    np.testing.assert_array_equal(rows[:, 6].numpy(), norms.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("grid, size", [((7, 7), (28, 28)), ((5, 3), (17, 11)), ((14, 14), (56, 56))])
def test_interpolate_equals_torch_bilinear(grid, size):
    rng = np.random.default_rng(2)
    products = torch.from_numpy(rng.normal(size=(6, grid[0] * grid[1])).astype(np.float32))
    out = torch.empty(6, size[0] * size[1])
    search._interpolate(products, grid, size, out)
    want = F.interpolate(products.view(1, 6, *grid), size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out.numpy(), want.reshape(6, -1).numpy(), rtol=1e-5, atol=1e-6)


def test_chunk_minima_from_concurrent_threads():
    """Dashboard sessions may search at once; each call gets its own, correct minima."""
    rng = np.random.default_rng(3)
    terms = random_terms(rng, (9, 7), ((5, 4),), 40)
    products = [torch.from_numpy(rng.normal(size=(63, 40)).astype(np.float32)) for _ in range(4)]
    within = torch.full((40,), np.inf)
    want = [fused.chunk_minima(product, terms, 0, 8, within, EXACT) for product in products]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            got = list(pool.map(lambda product: fused.chunk_minima(product, terms, 0, 8, within, EXACT), products))
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a.values.numpy(), b.values.numpy())
                np.testing.assert_array_equal(a.smallest.numpy(), b.smallest.numpy())


def copy_of_the_package(folder: Path) -> None:
    """The anomaly package copied into ``folder``, without any compiled cache."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "anomaly", folder / "anomaly",
                    ignore=shutil.ignore_patterns("__pycache__"))


def run_in_copy(script: str, folder: Path, env: dict[str, str]) -> str:
    """stdout of ``script`` (formatted with ``root``) run by a new interpreter on the copy in ``folder``."""
    done = subprocess.run([sys.executable, "-c", script.format(root=str(folder))], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


UNCACHED_SEARCH = """
import numpy as np, torch, anomaly
from anomaly import search
assert anomaly.__file__.startswith({root!r}), anomaly.__file__
rng = np.random.default_rng(0)
queries, gallery = rng.normal(size=(50, 24)).astype(np.float32), rng.normal(size=(300, 24)).astype(np.float32)
got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), 2, "fp32").numpy()
want = np.sort(((queries[:, None].astype(np.float64) - gallery[None]) ** 2).sum(-1), axis=1)[:, :2]
print(np.abs(got - want).max())
"""


TILED_MINIMA = """
import json, numpy as np, torch, anomaly
from anomaly import fused, search, tiledot
assert anomaly.__file__.startswith({root!r}), anomaly.__file__
rng = np.random.default_rng(0)
g, q = (torch.from_numpy(rng.normal(size=(n, 4)).astype(np.float32)) for n in (1, 8))
product = fused.TiledProduct(tiledot.pack_rows(g, tiledot.ROWS), g.pow(2).sum(1).numpy(), tiledot.pack_columns(-2 * q),
                             np.pad(q.pow(2).sum(1).numpy(), (0, tiledot.LANES)), 8)
terms = fused.Terms(np.zeros((0, 8), np.float32), *search._native_taps((), (1, 1)), np.zeros(1, np.float32))
exact = fused.Tolerance(np.zeros(8, np.float32), np.zeros(8, np.float32), 0.0)
minima = fused.chunk_minima(product, terms, 0, 8, torch.full((8,), np.inf), exact)
np.testing.assert_allclose(minima.values.numpy()[0], ((q - g) ** 2).sum(1).numpy(), rtol=1e-5, atol=1e-5)
stats = fused._tiled_minima.stats
print(json.dumps([sum(stats.cache_hits.values()), sum(stats.cache_misses.values())]))
"""


@pytest.mark.skipif(not tiledot.supported(torch.float32), reason="no float32 tiles")
def test_editing_tiledot_recompiles_the_loop_that_inlines_its_tile(tmp_path):
    """numba's disk cache keys a loop on its own file: the tiled minima loop also closes over tiledot.py's
    digest, so that it is compiled again, not loaded with the old tile, once tiledot.py changes."""
    copy_of_the_package(tmp_path)
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_CACHE_DIR"}  # beside the copy

    def run() -> list[int]:  # [cache hits, cache misses] of the tiled minima loop
        return json.loads(run_in_copy(TILED_MINIMA, tmp_path, env).strip().splitlines()[-1])

    assert run() == [0, 1]  # compiled, and cached beside the copy
    assert run() == [1, 0]  # loaded from the cache
    with open(tmp_path / "anomaly" / "tiledot.py", "a") as source:
        source.write("# edited\n")
    assert run() == [0, 1]  # compiled again


def test_compiles_in_memory_where_nothing_can_be_cached(tmp_path):
    """A read-only install run by a user without a writable home: numba finds nowhere to cache
    the loops, and the import must still work (it used to fail with numba's RuntimeError)."""
    copy_of_the_package(tmp_path)
    (tmp_path / "anomaly" / "__pycache__").write_text("")  # nothing can be cached beside the source
    nowhere = str(tmp_path / "anomaly" / "__pycache__" / "cache")  # under a file: not creatable, even by root
    env = {**os.environ, "HOME": nowhere, "XDG_CACHE_HOME": nowhere, "NUMBA_CACHE_DIR": nowhere}
    assert float(run_in_copy(UNCACHED_SEARCH, tmp_path, env).split()[-1]) < 1e-3


@pytest.mark.parametrize("k", [1, 3, 17, 40, 200])
def test_smallest_entries_rank_by_value_then_arrival(k):
    """The heap that prune and smallest select with, against numpy's stable sort: many ties, k below,
    near and above the group's size, and a group that lists entries out of order."""
    rng = np.random.default_rng(k)
    values = rng.integers(0, 9, 120).astype(np.float32)
    values[rng.integers(0, 120, 5)] = np.inf
    group = rng.permutation(120)[:57]
    got = fused._smallest_entries(values, group, k)
    np.testing.assert_array_equal(got, group[np.argsort(values[group], kind="stable")][:k])
