"""The search layer against brute force numpy on small cases."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly import fused, search, tiledot
from anomaly.features import stack_pyramid


def brute_force(queries: np.ndarray, gallery: np.ndarray, kappa: int) -> np.ndarray:
    d = ((queries.astype(np.float64)[:, None, :] - gallery.astype(np.float64)[None]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, :kappa]


def assert_matches(got: torch.Tensor, want: np.ndarray) -> None:
    """Both ranking precisions return the exact distances of the exact nearest pixels."""
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def random_pyramid(rng, count: int, channels=(6, 10, 12), size=(16, 12)) -> list[np.ndarray]:
    """Float16 levels at strides 1, 2, 4 of ``size`` (odd sizes too), like the bank's memory maps."""
    shapes = [(-(-size[0] // s), -(-size[1] // s)) for s in (1, 2, 4)]
    return [rng.normal(size=(count, c, *hw)).astype(np.float16) for c, hw in zip(channels, shapes)]


def stacked_pixels(levels: list[np.ndarray]) -> np.ndarray:
    """(images x pixels, C) float32 rows of the stacked pyramid, the naive gallery."""
    stacked = stack_pyramid([torch.from_numpy(level.astype(np.float32)) for level in levels])
    return stacked.permute(0, 2, 3, 1).reshape(-1, stacked.shape[1]).numpy()


@pytest.fixture(params=["full", "bounded", "bounded, written out", "bound given up"])
def products(request, monkeypatch):
    """Every kind of finest-grid product: the full one; the lower bound that the screen makes exact
    entry by entry, here forced for every block after a tile's first (a rank-2 projection, far looser
    than the real one, so many entries are recomputed), in bfloat16 never written out where the CPU
    can (a TiledProduct), or always written out; and the bound tried, found to let too much through, and
    the block multiplied again in full. Checks that each kind was run."""
    bounded, screened, unwritten = [], [], []
    if request.param == "bounded, written out":
        monkeypatch.setattr(search.tiledot, "supported", lambda dtype: False)
    if request.param != "full":
        monkeypatch.setattr(search, "BOUND_RANK", 2)
        monkeypatch.setattr(search, "BOUND_MIN_CHANNELS", 3)
        monkeypatch.setattr(search, "BOUND_MIN_KEPT", 0.0)
        monkeypatch.setattr(search, "BOUND_BELOW", 2.0)
        monkeypatch.setattr(search, "BOUND_GIVE_UP", -1.0 if request.param == "bound given up" else 2.0)
        monkeypatch.setattr(search, "GALLERY_TILE", 8)  # flat galleries in several blocks
        distances, screen = search._Plan.distances, search._Block.screen

        def distances_spy(*args):
            block = distances(*args)
            bounded.append(block.bounded)
            if block.bounded:
                unwritten.append((args[0].dtype, isinstance(block.product, fused.TiledProduct)))
            return block

        def screen_spy(block, *args):
            screened.append(block.bounded)
            return screen(block, *args)

        monkeypatch.setattr(search._Plan, "distances", distances_spy)
        monkeypatch.setattr(search._Block, "screen", screen_spy)
    yield request.param
    if request.param != "full":
        assert any(bounded), "no bounded block was multiplied"
        assert any(screened) == (request.param != "bound given up"), screened
        # Bounds are never written out where the CPU can form them in registers, and always where told it cannot.
        for dtype, in_registers in unwritten:
            assert in_registers == (request.param != "bounded, written out" and tiledot.supported(dtype)), dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kappa", [1, 3])
def test_pixel_knn_matches_brute_force(precision, kappa, products, monkeypatch):
    monkeypatch.setattr(search, "GALLERY_TILE", 37)  # several tiles, one ragged, short last chunks
    monkeypatch.setattr(search, "QUERY_TILE", {"fp32": 50, "bf16": 50})
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(130, 24)).astype(np.float32)
    gallery = rng.normal(size=(300, 24)).astype(np.float32)
    blocks = [torch.from_numpy(gallery[:120]), torch.from_numpy(gallery[120:])]
    got = search.pixel_knn(torch.from_numpy(queries), blocks, kappa=kappa, precision=precision)
    assert_matches(got, brute_force(queries, gallery, kappa))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("factor_min_channels", [8, 1000])  # coarse levels at native resolution, or upsampled
@pytest.mark.parametrize("size", [(16, 12), (15, 9)])
def test_pyramid_knn_equals_search_of_the_upsampled_gallery(precision, factor_min_channels, size, products,
                                                             monkeypatch):
    monkeypatch.setattr(search, "FACTOR_MIN_CHANNELS", {"fp32": factor_min_channels, "bf16": factor_min_channels})
    monkeypatch.setattr(search, "QUERY_TILE", {"fp32": 70, "bf16": 70})
    rng = np.random.default_rng(1)
    bank = random_pyramid(rng, 6, size=size)
    neighbours = np.array([4, 0, 2])
    query = random_pyramid(rng, 1, size=size)
    gallery = stacked_pixels([level[np.sort(neighbours)] for level in bank])
    for kappa in (1, 4):
        got = search.pyramid_knn([torch.from_numpy(level[0]) for level in query], bank, neighbours, kappa, precision)
        assert_matches(got, brute_force(stacked_pixels(query), gallery, kappa))


@pytest.mark.parametrize("native_from", [8, 1000])
def test_pyramid_knn_finds_each_image_in_itself(native_from, products, monkeypatch):
    """Every pixel of a bank image is at distance 0 from itself, however it was interpolated."""
    monkeypatch.setattr(search, "FACTOR_MIN_CHANNELS", {"fp32": native_from, "bf16": native_from})
    rng = np.random.default_rng(2)
    bank = random_pyramid(rng, 4)
    for precision in ("fp32", "bf16"):
        got = search.pyramid_knn([torch.from_numpy(level[2]) for level in bank], bank, np.arange(4), 2, precision)
        np.testing.assert_allclose(got[:, 0].numpy(), 0.0, atol=1e-5)
        assert (got[:, 1] > 0).all()


def test_pyramid_knn_does_not_depend_on_neighbour_order():
    rng = np.random.default_rng(6)
    bank = random_pyramid(rng, 5)
    query = [torch.from_numpy(level[0]) for level in random_pyramid(rng, 1)]
    first = search.pyramid_knn(query, bank, np.array([3, 1, 4]), 2, "fp32")
    np.testing.assert_array_equal(search.pyramid_knn(query, bank, np.array([4, 3, 1]), 2, "fp32"), first)
    # numpy levels (a bank image's own, read-only memory maps included) are accepted as queries
    readonly = [np.asarray(level[0]) for level in random_pyramid(rng, 1)]
    for level in readonly:
        level.flags.writeable = False
    search.pyramid_knn(readonly, bank, np.array([0]), 1, "fp32")


def test_kappa_beyond_a_tile_and_beyond_the_gallery(monkeypatch):
    monkeypatch.setattr(search, "GALLERY_TILE", 16)
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(9, 5)).astype(np.float32)
    gallery = rng.normal(size=(40, 5)).astype(np.float32)
    got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), kappa=35, precision="fp32")
    np.testing.assert_allclose(got.numpy(), brute_force(queries, gallery, 35), rtol=1e-5, atol=1e-5)
    small = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery[:3]), kappa=5, precision="bf16")
    np.testing.assert_allclose(small[:, :3].numpy(), brute_force(queries, gallery[:3], 3), rtol=1e-5, atol=1e-5)
    assert torch.isinf(small[:, 3:]).all()  # fewer gallery pixels than kappa: the rest are infinitely far


def test_kappa_beyond_the_candidate_cap(products):
    """More neighbours asked for than the candidates kept per query by default: none may be lost."""
    rng = np.random.default_rng(8)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    gallery = rng.normal(size=(700, 8)).astype(np.float32)
    kappa = search.MAX_CANDIDATES + 44
    for precision in ("fp32", "bf16"):
        got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), kappa=kappa, precision=precision)
        assert not torch.isinf(got).any()
        np.testing.assert_allclose(got.numpy(), brute_force(queries, gallery, kappa), rtol=1e-5, atol=1e-5)


def test_pixel_knn_exact_on_duplicates_and_zero_distance(products):
    gallery = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)
    for precision in ("fp32", "bf16"):
        got = search.pixel_knn(torch.from_numpy(np.eye(4, dtype=np.float32)), [torch.from_numpy(gallery)], 2, precision)
        np.testing.assert_array_equal(got.numpy(), np.zeros((4, 2), np.float32))


@pytest.mark.parametrize("kappa", [1, 3])
def test_bf16_ranking_still_finds_neighbours_closer_than_its_rounding(kappa, products):
    """Gallery rows whose distances differ by far less than bfloat16 resolves (0.4 % of the norms):
    the error bound keeps every one that might be nearest, and the exact recompute picks it."""
    rng = np.random.default_rng(7)
    queries = (rng.normal(size=(40, 32)) * 10 + 5).astype(np.float32)
    offsets = rng.normal(size=(40, 25, 32)).astype(np.float32)
    offsets *= (1 + np.arange(25, dtype=np.float32)[None, :, None] * 1e-4) / np.linalg.norm(offsets, axis=-1, keepdims=True)
    gallery = (queries[:, None] + offsets).reshape(-1, 32)[rng.permutation(40 * 25)]
    want = brute_force(queries, gallery, kappa)
    assert np.diff(np.sort(((queries[:, None] - gallery[None]) ** 2).sum(-1), axis=1)[:, :2]).min() < 1e-2
    got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), kappa=kappa, precision="bf16")
    assert_matches(got, want)


def test_bf16_tolerance_covers_every_rounded_distance():
    """Each bfloat16 ranking distance r (a product of rounded rows, written out) lies within the plan's
    tolerance of the exact distance d: |r - offset - d| <= slack + roundoff * d. Rows near 8 = 2^3 round
    by up to 2^-8 of their size, twice the 2^-9 once assumed."""
    rng = np.random.default_rng(11)
    rows = (np.where(np.arange(600) % 2, 8.03, -8.03)[:, None] * np.eye(16)[0]
            + rng.normal(size=(600, 16)) * 0.3).astype(np.float32)
    queries, gallery = torch.from_numpy(rows[:100]), torch.from_numpy(rows[100:])
    plan = search._Plan([queries[None]], torch.bfloat16, search.FACTOR_MIN_CHANNELS["bf16"])
    image = plan.gallery([gallery[None]])
    tolerance = plan.tolerance(image)
    ranking = plan.distances(image, slice(0, 100)).product.double().numpy()
    exact = ((gallery.double()[:, None] - queries.double()[None]) ** 2).sum(-1).numpy()
    error = np.abs(ranking - tolerance.offset - exact)
    assert (error <= tolerance.slack + tolerance.roundoff * exact).all()
    assert (error > 0.5 * tolerance.slack).any()  # the bound is not loose here


def test_bf16_ranking_keeps_as_few_candidates_as_float32_where_near_pixels_are_far_closer_than_its_rounding(
        monkeypatch):
    """Two uniform regions (pixels 0.01 apart, 20 apart across): bfloat16's rounding bound (about 1 here)
    covers every pixel of a region, so entries bracketed by it kept hundreds of candidates per query. The
    screen forms the entries that pass again from float32 rows and brackets them by float32's bound."""
    rng = np.random.default_rng(10)
    sides = np.where(np.arange(1200) % 2, 10.0, -10.0)[:, None] * np.eye(32)[0]
    pixels = (sides + rng.normal(size=(1200, 32)) * 0.01).astype(np.float32)
    queries, gallery = pixels[:200], pixels[200:]
    candidates = {}
    exact = search._exact

    def counting(queries, images, query_ids, pixel_ids):
        candidates[precision] = len(pixel_ids) / len(queries)
        return exact(queries, images, query_ids, pixel_ids)

    monkeypatch.setattr(search, "_exact", counting)
    for precision in ("fp32", "bf16"):
        got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), kappa=1, precision=precision)
        assert_matches(got, brute_force(queries, gallery, 1))
    assert candidates["bf16"] <= 2 * candidates["fp32"] + 1, candidates


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ranking_finds_neighbours_closer_than_float32_resolves_far_from_the_centre(precision, products):
    """Queries far from their mean (norms about 1,000 after centring) with neighbours at distances
    1 + i * 1e-3: a float32 ranking distance |q|^2 + |g|^2 - 2 q.g rounds by more than those gaps
    (ulp(1e6) = 0.06), so its error bound must keep them all for the exact recompute to pick the nearest."""
    rng = np.random.default_rng(8)
    queries = rng.normal(size=(40, 32)).astype(np.float32) * 10
    queries[:, 0] += np.where(np.arange(40) % 2, 1000.0, -1000.0)
    offsets = rng.normal(size=(40, 25, 32))
    offsets *= np.sqrt(1 + np.arange(25)[None, :, None] * 1e-3) / np.linalg.norm(offsets, axis=-1, keepdims=True)
    gallery = (queries[:, None] + offsets).astype(np.float32).reshape(-1, 32)[rng.permutation(40 * 25)]
    want = brute_force(queries, gallery, 1)
    got = search.pixel_knn(torch.from_numpy(queries), torch.from_numpy(gallery), kappa=1, precision=precision)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-4)


def test_ties_return_the_tied_distance(products):
    """Many gallery rows at exactly the same distance: any of them is a correct neighbour."""
    gallery = np.zeros((200, 3), np.float32)
    gallery[:, 0] = np.tile([1.0, -1.0], 100)
    got = search.pixel_knn(torch.zeros(5, 3), torch.from_numpy(gallery), kappa=3, precision="fp32")
    np.testing.assert_array_equal(got.numpy(), np.ones((5, 3), np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mix_spread_is_what_interpolating_squared_distances_adds(dtype):
    rng = np.random.default_rng(4)
    level = torch.from_numpy(rng.normal(size=(5, 7, 6)).astype(np.float32)).to(dtype)
    for size in [(28, 24), (10, 9), (7, 6)]:
        up = F.interpolate(level[None].double(), size=size, mode="bilinear", align_corners=False)[0]
        mean_sq = F.interpolate(level.double().pow(2).sum(0)[None, None], size=size, mode="bilinear",
                                align_corners=False)
        want = (mean_sq[0, 0] - up.pow(2).sum(0)).reshape(-1)
        got = fused.mix_spread(level.permute(1, 2, 0).contiguous(), search._level_taps((7, 6), size), size)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_exact_distances_are_those_to_the_stacked_pyramid(dtype):
    """Pairs from several gallery images, in any order, against float64 numpy on stack_pyramid's pixels
    (float16 levels as the bank stores them, float32 as pixel_knn passes them)."""
    rng = np.random.default_rng(5)
    levels = [level.astype(dtype) for level in random_pyramid(rng, 3, size=(15, 9))]
    gallery = stacked_pixels(levels)  # (3 * 135, C): image n's pixels from n * 135
    queries = rng.normal(size=(7, gallery.shape[1])).astype(np.float32)
    query_ids = rng.integers(0, 7, 40)
    pixel_ids = rng.integers(0, len(gallery), 40)
    images = [[torch.from_numpy(np.ascontiguousarray(level[n].transpose(1, 2, 0))) for level in levels] for n in range(3)]
    got = search._exact(torch.from_numpy(queries), images, torch.from_numpy(query_ids), torch.from_numpy(pixel_ids))
    want = ((queries[query_ids].astype(np.float64) - gallery[pixel_ids].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_bf16_asked_for_without_native_bfloat16_is_warned_about(no_native_bf16):
    """Emulated bfloat16 made the search 18x slower (AVX2 build): a user forcing it should hear so,
    once however many searches ask."""
    with pytest.warns(RuntimeWarning, match="no native bfloat16") as caught:
        for _ in range(3):
            assert search.resolve_precision("bf16") == "bf16"
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert search.resolve_precision("auto") == search.resolve_precision("fp32") == "fp32"


def test_pixel_knn_rejects_bad_kappa_precision_and_channels():
    assert search.resolve_precision("auto") == ("bf16" if search.bf16_supported() else "fp32")
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kappa"):
        search.pixel_knn(q, [q], kappa=0)
    with pytest.raises(ValueError, match="precision"):
        search.pixel_knn(q, [q], precision="fp8")
    with pytest.raises(ValueError, match="channels"):
        search.pixel_knn(q, [torch.zeros(2, 4)])


def test_principal_directions_never_lengthen_a_projection():
    """The bound needs |B^T x| <= |x| for every x, rounding included: orthonormal rows, shrunk."""
    rng = np.random.default_rng(9)
    rows = torch.from_numpy((rng.normal(size=(500, 12)) * np.linspace(5, 0.1, 12)).astype(np.float32))
    centred = rows - rows.mean(0)
    basis, kept = search._principal_directions(centred, 4)
    variances = centred.double().pow(2).sum(0).sort(descending=True).values
    assert kept == pytest.approx(float(variances[:4].sum() / variances.sum()), rel=0.02)
    assert basis.shape == (8, 16)
    assert (basis[4:] == 0).all() and (basis[:, 12:] == 0).all()  # room for the norm columns
    directions = basis[:4, :12].double()
    np.testing.assert_allclose((directions @ directions.T).numpy(), np.eye(4) * (1 - 2.0**-12) ** 2, atol=1e-6)
    # the leading principal axes of these rows are the first coordinates
    np.testing.assert_allclose(directions.abs().argmax(1).sort().values.numpy(), [0, 1, 2, 3])
    x = torch.from_numpy(rng.normal(size=(2000, 12)).astype(np.float32))
    assert ((x @ basis[:4, :12].T).pow(2).sum(1) <= x.pow(2).sum(1)).all()


def test_bound_only_where_its_directions_hold_most_of_the_spread():
    rng = np.random.default_rng(10)
    correlated = rng.normal(size=(40, 40, 4)) @ rng.normal(size=(4, 64)) + 0.05 * rng.normal(size=(40, 40, 64))
    noise = rng.normal(size=(40, 40, 64))
    for pixels, bounded in [(correlated, True), (noise, False)]:
        plan = search._Plan([torch.from_numpy(pixels.astype(np.float32))], torch.float32, 1000)
        assert (plan._basis is not None) == bounded


@pytest.mark.parametrize(("rows", "columns", "inner"), [(196, 196, 116), (1024, 256, 128)])  # below / above
def test_matmul_is_the_product_and_leaves_small_ones_to_torch(rows, columns, inner, monkeypatch):
    """Either way ``a @ b.T`` to float32 rounding; oneDNN is only considered for products of at least
    ONEDNN_MIN_PRODUCT multiply-adds, where its fixed cost per call is worth paying."""
    asked = []
    monkeypatch.setattr(search, "_onednn_float32", lambda: asked.append(True) or True)
    rng = np.random.default_rng(rows)
    a, b = (torch.from_numpy(rng.normal(size=(n, inner)).astype(np.float32)) for n in (rows, columns))
    got = search._matmul(a, b)
    want = a.double() @ b.double().T
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-4 * float(want.abs().max()))
    assert bool(asked) == (rows * columns * inner >= search.ONEDNN_MIN_PRODUCT)


def test_knn_and_index_agree_with_brute_force():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    want = brute_force(queries, gallery, 7)
    d, i = search.knn(queries, gallery, 7)
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4)
    d2, i2 = search.build_index(gallery).search(queries, 7)
    np.testing.assert_array_equal(i, i2)
    assert search.knn(queries, gallery, 100)[0].shape == (5, 40)  # k clipped to the gallery


WARM_UP_THEN_REAL = """
import json, sys
from pathlib import Path

import numba
from anomaly import fused, search, tiledot
from anomaly.sources import collect_inputs
from anomaly.spade import SPADE
sys.path.insert(0, "tests")
from imagegen import write_images

def signatures():
    return {f"{module.__name__}.{name}": len(value.signatures) for module in (fused, tiledot)
            for name, value in vars(module).items() if isinstance(value, numba.core.registry.CPUDispatcher)}

precision, folder = sys.argv[1], Path(sys.argv[2])
write_images(folder / "train", range(5))
write_images(folder / "test", [7], defect=True)
search.warm_up(precision)
warm = signatures()
model = SPADE(backbone="efficientnet_lite0", k=3, precision=precision, calibration_images=2)
model.fit(collect_inputs([folder / "train"]).items)
results = list(model.score(collect_inputs([folder / "test"]).items, maps=True))
print(json.dumps({"warm": warm, "real": signatures(), "maps": sum(r.anomaly_map is not None for r in results)}))
"""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_warm_up_compiles_everything_a_real_search_uses(precision, tmp_path):
    """In a fresh process, after warm_up, fitting a bank (calibration maps) and scoring with maps compile
    nothing more: every loop they call was already compiled (or loaded from numba's cache) for their types."""
    root = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-c", WARM_UP_THEN_REAL, precision, str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["maps"] == 1
    assert found["warm"]["anomaly.fused._chunk_minima"] >= 1  # the warm-up did run the search
    instructions = tiledot.instructions(torch.bfloat16 if precision == "bf16" else torch.float32)
    if instructions:  # and took the bound in registers
        loop = "_amx_minima" if instructions == "AMX-BF16" else "_tiled_minima"
        assert found["warm"][f"anomaly.fused.{loop}"] == 1
    assert found["real"] == found["warm"]
