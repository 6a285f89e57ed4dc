"""Benchmarks of the SPADE engine on this machine; every section prints one table.

    python bench/bench.py --dataset ../shared/datasets/magnetic_tile --backbone efficientnet_lite0
    python bench/bench.py --backbone wide_resnet50_2 --weights random --train 100 --section pixel

Sections (``--section``, repeatable; default all but ``bank5000``):

* ``pixel``      pixel maps at K neighbours: the naive reference (the query's and the K images'
                 pixels stacked from the bank's levels, then torch.cdist of all query pixels
                 against the whole gallery, then the minimum) and one faiss.knn call per image on
                 the same stacked pixels, against the library's search with float32 and bfloat16
                 ranking, which reads the same levels; the stacking is also reported apart;
                 achieved FLOP/s against this machine's own matrix-multiply throughput measured
                 in the same run; how often the two rankings' distances differ at all.
* ``bound``      one bounded block of the pixel search: the bound multiplied by oneDNN, written
                 out and reduced, against formed in registers by the reducing loop (AVX512-BF16).
* ``accuracy``   pixel ROC AUC / PRO (and image ROC AUC) with float32 and with bfloat16 ranking
                 over the whole test set, and how far their maps differ.
* ``prepare``    decoding and preparing one image (resize to the backbone's input, normalise, thumbnail)
                 at 448, 1,024 and 2,448 px, against Pillow alone (what the library used before):
                 decoding PNG (anomaly.png; libpng too) and JPEG (libjpeg-turbo through imagecodecs),
                 and the compiled resize, with how far their results differ; a grey JPEG kept grey
                 against repeated into RGB.
* ``throughput`` bank building and image-level scoring in images/s against the backbone's bare
                 forward pass on the same batch; decoding alone, and what decoding, then the
                 forward, one after the other would allow.
* ``memory``     bank bytes per normal image; peak resident memory while scoring 1, 4 and 16
                 batches of images (streaming: it should not grow).
* ``scaling``    image-level and pixel-level cost against the bank size (synthetic features).
* ``bank5000``   build and score a bank of ``--synthetic`` generated normal images (default 500).

Timings interleave the variants they compare and keep each one's best repeat, because other
processes share the machine; ratios within one run are the figures to trust.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import imagecodecs
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: importing anomaly sets torch's allocator and OpenMP's spinning up
from anomaly import SPADE, allocator, features, fused, openmp, search, tiledot  # noqa: E402
from anomaly.bank import PyramidSpill  # noqa: E402
from anomaly.datasets import MVTecCategory, load_mvtec_category  # noqa: E402
from anomaly.demo import make_demo_dataset  # noqa: E402
from anomaly.evaluation import evaluate  # noqa: E402
from anomaly.features import THUMBNAIL_SIZE, iter_batches, load, prepare, run_backbone, stack_pyramid  # noqa: E402
from anomaly.imageio import load_pixels, to_float  # noqa: E402
from anomaly.threads import configure_threads  # noqa: E402

import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
"""torch's own kernels, oneDNN's and MKL's, limited to AVX2 (``--avx2``)."""
SECTIONS = ("pixel", "bound", "accuracy", "prepare", "throughput", "memory", "scaling", "bank5000")


# ---- measuring ------------------------------------------------------------------------
def times_in_turns(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each variant, ``repeats`` rounds of all of them in turns, so that load from other
    processes hits all alike and one round's times are taken close together."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def best_times(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each variant, run in turns (`times_in_turns`)."""
    return {name: min(seconds) for name, seconds in times_in_turns(variants, repeats).items()}


class PeakRSS:
    """Peak resident memory of this process, sampled every few ms (ru_maxrss cannot be reset).

    ``peak`` is all resident pages; ``peak_private`` leaves out file-backed ones, such as the
    bank's memory-mapped pyramid, which the kernel can drop at any time.
    """

    def __enter__(self) -> "PeakRSS":
        self._process = psutil.Process()
        info = self._process.memory_info()
        self.start, self.start_private = info.rss, info.rss - info.shared
        self.peak, self.peak_private = self.start, self.start_private
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            info = self._process.memory_info()
            self.peak = max(self.peak, info.rss)
            self.peak_private = max(self.peak_private, info.rss - info.shared)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def matmul_rate(dtype: torch.dtype, repeats: int = 5) -> float:
    """This machine's matrix-multiply throughput (FLOP/s), (3136 x 1024) @ (1024 x 3136), through the
    routine the search multiplies with (oneDNN; torch.mm's MKL float32 is slower on AMD CPUs)."""
    a, b = torch.randn(3136, 1024).to(dtype), torch.randn(3136, 1024).to(dtype)
    return 2 * 3136 * 1024 * 3136 / best_times({"mm": lambda: search._matmul(a, b)}, repeats)["mm"]


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- data -------------------------------------------------------------------------------
def category(args) -> MVTecCategory:
    try:
        data = load_mvtec_category(args.dataset)
    except ValueError as error:  # one line, not a traceback
        raise SystemExit(f"bench: {error} (--dataset takes a category in the MVTec AD layout)") from None
    if args.train:
        data.train = data.train[:: max(1, len(data.train) // args.train)][: args.train]
    return data


def spread(items: list, count: int) -> list:
    """``count`` items evenly spaced over the list (every defect type gets its share)."""
    return [items[i] for i in np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)]


def model(args, **params) -> SPADE:
    return SPADE(args.backbone, args.weights, k=args.k, kappa=args.kappa, batch_size=args.batch, **params)


def test_features(fitted: SPADE, items: list) -> list[tuple[list[torch.Tensor], np.ndarray]]:
    """Per test image: its pyramid levels and its K neighbours."""
    out = []
    for batch in iter_batches(fitted.extractor, items, fitted.batch_size):
        _, neighbours = fitted.nearest_images(batch.global_features)
        out += [([level[row] for level in batch.pyramid], nearest) for row, nearest in enumerate(neighbours)]
    return out


def stacked_pixels(query: list[torch.Tensor], pyramid: list[np.ndarray], neighbours: np.ndarray
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the references compare: the query's pixels (P, C) and all pixels of its K neighbours
    (K * P, C), stacked by :func:`stack_pyramid` from the levels the search reads (the bank's)."""
    def rows(stacked: torch.Tensor) -> torch.Tensor:
        return stacked.permute(0, 2, 3, 1).reshape(-1, stacked.shape[1]).contiguous()

    gallery = stack_pyramid([torch.from_numpy(np.asarray(level[neighbours], np.float32)) for level in pyramid])
    return rows(stack_pyramid([level[None] for level in query])), rows(gallery)


def nominal_flops(channels: list[int], grids: list[tuple[int, int]], images: int) -> float:
    """Multiply-add FLOPs of every stacked query pixel against every stacked gallery pixel."""
    pixels = grids[0][0] * grids[0][1]
    return 2.0 * images * pixels**2 * sum(channels)


def executed_work(query: list[torch.Tensor], pyramid: list[np.ndarray], neighbours: np.ndarray, kappa: int,
                  precision: str) -> tuple[float, float]:
    """(multiply-add FLOPs of the matrix products one search runs, share of its blocks multiplied by the
    bound), counted in an untimed run. The products: the finest-grid ones, full or bounded as the search
    chooses per block (those formed inside the minima loop, TiledProducts, too), the native levels' products
    and their interpolation, and the bound's projections."""
    flops, blocks = [0.0], []
    multiply, distances = search._matmul, search._Plan.distances

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        flops[0] += 2.0 * a.shape[0] * b.shape[0] * a.shape[1]
        return multiply(a, b)

    def recording(plan, *args, **kwargs):
        block = distances(plan, *args, **kwargs)
        blocks.append(block.bounded)
        if isinstance(block.product, fused.TiledProduct):
            gallery, queries = block.product.shape
            packed = block.product.gallery
            columns = packed.shape[1] * (2 if packed.dtype == np.int32 else 1)  # int32: bfloat16 pairs
            flops[0] += 2.0 * gallery * queries * columns
        return block

    search._matmul, search._Plan.distances = counting, recording
    try:
        search.pyramid_knn(query, pyramid, neighbours, kappa, precision)
    finally:
        search._matmul, search._Plan.distances = multiply, distances
    return flops[0], float(np.mean(blocks))


def default_precision(args) -> str:
    """The ranking the library picks here, or, with ``--avx2``, on an AVX2 CPU (which has no native bfloat16;
    this process's /proc/cpuinfo still says this machine's)."""
    return "fp32" if args.avx2 else search.resolve_precision("auto")


# ---- sections ---------------------------------------------------------------------------
def naive_nearest(queries: torch.Tensor, gallery: torch.Tensor, kappa: int) -> torch.Tensor:
    """The reference: torch.cdist of all query pixels against the whole gallery, then the minimum."""
    return torch.cdist(queries, gallery).topk(kappa, dim=1, largest=False).values.pow(2)


def faiss_nearest(queries: torch.Tensor, gallery: torch.Tensor, kappa: int) -> torch.Tensor:
    """The obvious faster baseline: one exact faiss.knn call per image on the stacked gallery."""
    return torch.from_numpy(search.knn(queries.numpy(), gallery.numpy(), kappa)[0])


def section_pixel(args) -> None:
    data = category(args)
    fitted = model(args, calibration_images=0).fit(data.train)
    bank = fitted.bank
    cases = test_features(fitted, spread([entry.item for entry in data.test], args.test))
    channels = [level.shape[1] for level in bank.pyramid]
    grids = [tuple(level.shape[2:]) for level in bank.pyramid]
    precisions = {"naive": "fp32", "faiss": "fp32", "fp32": "fp32", "bf16": "bf16"}
    references = {"naive": naive_nearest, "faiss": faiss_nearest}
    seconds: dict[str, list[float]] = {name: [] for name in ["stack", *precisions]}
    gaps, rates = {name: 0.0 for name in precisions if name != "naive"}, {}
    absolute_gaps = dict(gaps)
    differ, bf16_gap = [], 0.0
    executed: dict[str, list[float]] = {"fp32": [], "bf16": []}
    bounded: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for index, (query, neighbours) in enumerate(cases):
        out: dict[str, torch.Tensor] = {}
        # Every path starts from the query's levels and the bank: the search reads the K images'
        # levels itself, so the references' stacking of the same pixels is timed too ("stack"),
        # and then reported with them and apart. All run in turns, each its best of the same number
        # of repeats: a path timed fewer times would keep more of the machine's noise.
        variants = {"stack": lambda: out.__setitem__("stacked", stacked_pixels(query, bank.pyramid, neighbours))}
        variants |= {name: lambda name=name, run=run: out.__setitem__(name, run(*out["stacked"], args.kappa))
                     for name, run in references.items()}
        variants |= {name: lambda name=name: out.__setitem__(name, search.pyramid_knn(
            query, bank.pyramid, neighbours, args.kappa, precisions[name])) for name in ("fp32", "bf16")}
        best = best_times(variants, args.repeats)
        query_pixels = len(out.pop("stacked")[0])
        for name in seconds:
            seconds[name].append(best[name])
        for name in gaps:
            gap = (out[name] - out["naive"]).abs()
            gaps[name] = max(gaps[name], float((gap / out["naive"].clamp_min(1e-12)).max()))
            absolute_gaps[name] = max(absolute_gaps[name], float(gap.max()))
        differ.append(float((out["bf16"] != out["fp32"]).float().mean()))
        bf16_gap = max(bf16_gap, float(((out["bf16"] - out["fp32"]).abs() / out["fp32"].clamp_min(1e-12)).max()))
        for name in ("fp32", "bf16"):
            flops, share = executed_work(query, bank.pyramid, neighbours, args.kappa, precisions[name])
            executed[name].append(flops)
            bounded[name].append(share)
        if index == 0:  # the machine's own matrix-multiply throughput, in the same run
            rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    images = len(cases[0][1])
    stack = np.array(seconds["stack"])
    # A reference's time per image: stacking the pixels, then its search.
    total = {name: np.array(seconds[name]) + (stack if name in references else 0.0) for name in precisions}
    naive, cdist_only, faiss_time = float(np.median(total["naive"])), float(np.median(seconds["naive"])), \
        float(np.median(total["faiss"]))
    rows = []
    default = default_precision(args)
    nominal = nominal_flops(channels, grids, images)
    labels = {"naive": "naive: stack pixels, torch.cdist + min", "faiss": "stack pixels, faiss.knn",
              "fp32": "search, fp32 ranking" + " (default)" * (default == "fp32"),
              "bf16": "search, bf16 ranking" + " (default)" * (default == "bf16")}
    for name, label in labels.items():
        t, precision = float(np.median(total[name])), precisions[name]
        compute = float(np.median(seconds[name]))  # a reference's FLOP/s count its search only
        flops = float(np.median(executed[name])) if name in executed else nominal
        rows.append([label, t, naive / t, cdist_only / t, faiss_time / t, nominal / compute / 1e9,
                     flops / compute / 1e9,
                     f"{nominal / compute / rates[precision]:.0%} / {flops / compute / rates[precision]:.0%} of {precision}",
                     f"{absolute_gaps.get(name, 0.0):.2g}", f"{gaps.get(name, 0.0):.2g}"])
    table(f"Pixel maps: {args.backbone} ({bank.identity.weights}), K={images}, kappa={args.kappa}, "
          f"{query_pixels} query pixels, C={sum(channels)}, bank of {len(bank)}, {len(cases)} test images "
          f"(median over the images of each path's best of {args.repeats} repeats, all in turns)",
          ["path", "s / image", "x naive", "x naive's cdist + min alone", "x faiss", "nominal GFLOP/s",
           "executed GFLOP/s", "nominal / executed of the matmul peak", "max |d - naive|",
           "max |d - naive| / naive"], rows)
    ratios = total["naive"] / np.array(seconds[default])
    alone = np.array(seconds["naive"]) / np.array(seconds[default])
    print(f"Stacking the query's and the K images' pixels from the bank's levels (stack_pyramid) takes "
          f"{np.median(stack):.3f} s of the naive reference's {naive:.3f} s per image; the rest is torch.cdist + min "
          f"({cdist_only:.3f} s). Speed-up of {default} per image {ratios.min():.1f}x-{ratios.max():.1f}x "
          f"({alone.min():.1f}x-{alone.max():.1f}x against cdist + min alone).")
    print(f"Matmul peak here, (3136x1024) @ (1024x3136): fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 "
          f"{rates['bf16'] / 1e9:.0f} GFLOP/s. Nominal = 2*P*G*C = {nominal / 1e12:.2f} TFLOP per image; the search "
          f"executes {np.median(executed['fp32']) / 1e12:.3f} (fp32) and {np.median(executed['bf16']) / 1e12:.3f} "
          f"(bf16): levels with at least {search.FACTOR_MIN_CHANNELS} channels are multiplied at native "
          f"resolution, and {np.mean(bounded['fp32']):.0%} (fp32) and {np.mean(bounded['bf16']):.0%} (bf16) of the "
          f"finest-grid products are the rank-{search.BOUND_RANK} bound. bf16 against fp32 ranking: "
          f"{np.mean(differ):.4%} of pixel distances differ at all, by at most {bf16_gap:.2g} (relative).")


def section_bound(args) -> None:
    """One bounded block, the pixel search's most frequent piece of work: the first test image's first
    query tile against its nearest normal image, the bound multiplied and written out (oneDNN) and then
    reduced by the minima loop, against formed in registers by the minima loop itself (TiledProduct)."""
    if not tiledot.supported(torch.bfloat16):
        print("\n(section bound: no AVX512-BF16 here, so the bound is always multiplied and written out)")
        return
    data = category(args)
    fitted = model(args, calibration_images=0).fit(data.train)
    [(query, neighbours)] = test_features(fitted, spread([entry.item for entry in data.test], 1))
    gallery = [torch.from_numpy(np.ascontiguousarray(np.asarray(level[neighbours[0]]).transpose(1, 2, 0)))
               for level in fitted.bank.pyramid]
    query = [level.float().permute(1, 2, 0).contiguous() for level in query]
    pixels = query[0].shape[0] * query[0].shape[1]
    rows = search._query_tiles(pixels, "bf16")[0]  # the search's first query tile
    plans = {name: search._Plan(query, torch.bfloat16, search.FACTOR_MIN_CHANNELS["bf16"], registers)
             for name, registers in [("in registers", True), ("written out", False)]}
    if plans["in registers"]._basis is None:
        print("\n(section bound: these features fail the bound's rule, so it is not used)")
        return
    within = torch.full((rows.stop - rows.start,), float("inf"))
    images = {name: plan.gallery(gallery) for name, plan in plans.items()}
    blocks = {name: plan.distances(images[name], rows, True) for name, plan in plans.items()}
    tolerance = {name: plan.tolerance(images[name]).rows(rows) for name, plan in plans.items()}
    repeat = 20  # calls per timing: one takes a fraction of a millisecond

    def loop(work: Callable[[], object]) -> Callable[[], None]:
        return lambda: [work() for _ in range(repeat)]

    written = plans["written out"]
    best = best_times({
        "product": loop(lambda: search._matmul(images["written out"].bound, written._bound[rows])),
        "written": loop(lambda: blocks["written out"].chunk_minima(within, tolerance["written out"])),
        "registers": loop(lambda: blocks["in registers"].chunk_minima(within, tolerance["in registers"])),
    }, max(args.repeats, 5))
    gallery_pixels, queries = blocks["written out"].product.shape
    flops = 2.0 * gallery_pixels * queries * search.BOUND_RANK
    peak = matmul_rate(torch.bfloat16)
    totals = {"written out (oneDNN product, then the minima loop)": best["product"] + best["written"],
              f"in registers (the minima loop forms it, {tiledot.instructions(torch.bfloat16)})": best["registers"]}
    table(f"One bounded block: {gallery_pixels} gallery x {queries} query pixels, rank {search.BOUND_RANK}, "
          f"{args.backbone} (best of {max(args.repeats, 5)} x {repeat} calls, in turns)",
          ["bound", "ms per block", "GFLOP/s of the bound's products", "of the bf16 matmul peak"],
          [[name, seconds / repeat * 1e3, flops / (seconds / repeat) / 1e9, f"{flops / (seconds / repeat) / peak:.0%}"]
           for name, seconds in totals.items()])
    print(f"Written out: the product {best['product'] / repeat * 1e3:.3f} ms, the minima loop reading it back "
          f"{best['written'] / repeat * 1e3:.3f} ms. Both paths include the coarse terms and the chunk minima. "
          f"bf16 matmul peak here {peak / 1e9:.0f} GFLOP/s.")


def section_accuracy(args) -> None:
    data = category(args)
    rows, maps = [], {}
    for precision in ("fp32", "bf16"):
        start = time.perf_counter()
        report, scored = evaluate(data, model(args, precision=precision))
        maps[precision] = [s.result.anomaly_map for s in scored]
        rows.append([precision, report.image_auroc_knn, report.image_auroc_map_max, report.pixel_auroc, report.pro,
                     report.seconds["per_test_image"], time.perf_counter() - start])
    gaps = [float(np.abs(a - b).max()) for a, b in zip(maps["fp32"], maps["bf16"])]
    scale = max(float(np.abs(m).max()) for m in maps["fp32"])
    table(f"Accuracy: {Path(args.dataset).name}, {args.backbone}, K={args.k}, kappa={args.kappa}, "
          f"{len(data.train)} train / {len(maps['fp32'])} test images",
          ["ranking", "image AUROC (knn)", "image AUROC (map max)", "pixel AUROC", "PRO", "s / test image (maps)",
           "total s"], rows)
    print(f"max |map_bf16 - map_fp32| = {max(gaps):.4g} (largest map value {scale:.4g}); "
          f"images whose maps differ at all: {np.mean([g > 0 for g in gaps]):.1%}")


def pillow_prepare(image: np.ndarray, side: int, mean: np.ndarray, std: np.ndarray, thumbnail: np.ndarray | None
                   ) -> np.ndarray:
    """The same preparation with Pillow, as the library did it before `anomaly.resample`: each channel
    copied to float32, then resized (in double precision, the same filter) to the input and the thumbnail."""
    resized = np.empty((3, side, side), np.float32)
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(to_float(image[..., c])))
        resized[c] = np.asarray(plane.resize((side, side), Image.Resampling.BILINEAR))
        if thumbnail is not None:
            small = np.asarray(plane.resize(thumbnail.shape[1::-1], Image.Resampling.BILINEAR))
            thumbnail[..., c] = np.clip(np.rint(small * 255.0), 0, 255)
    return (resized - mean.reshape(3, 1, 1)) / std.reshape(3, 1, 1)


def pillow_decode(data: bytes) -> np.ndarray:
    """An RGB or grey file as Pillow alone decoded it for the library before imagecodecs."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def section_prepare(args) -> None:
    identity = model(args).extractor.identity
    path = category(args).train[0].path
    source = Image.open(path).convert("RGB")
    mean, std = np.asarray(identity.mean, np.float32), np.asarray(identity.std, np.float32)
    repeats = max(args.repeats, 5)
    decoding, resizing = [], []
    for side in (448, 1024, 2448):
        encoded = {}
        for form in ("PNG", "JPEG"):
            stream = io.BytesIO()
            source.resize((side, side), Image.Resampling.BICUBIC).save(stream, form, quality=95)
            encoded[form] = stream.getvalue()
        image, thumbnail = load_pixels(encoded["PNG"]), np.empty((THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)
        best = best_times({
            **{f"{form} library": lambda form=form: load_pixels(encoded[form]) for form in encoded},
            **{f"{form} Pillow": lambda form=form: pillow_decode(encoded[form]) for form in encoded},
            "PNG libpng": lambda: imagecodecs.png_decode(encoded["PNG"]),
            "Pillow": lambda: pillow_prepare(image, identity.image_size, mean, std, None),
            "Pillow+thumbnail": lambda: pillow_prepare(image, identity.image_size, mean, std, thumbnail),
            "compiled": lambda: prepare(image, identity),
            "compiled+thumbnail": lambda: prepare(image, identity, thumbnail),
        }, repeats)
        same = (all(np.array_equal(load_pixels(data), pillow_decode(data)) for data in encoded.values())
                and np.array_equal(load_pixels(encoded["PNG"]), imagecodecs.png_decode(encoded["PNG"])))
        ms = {key: value * 1e3 for key, value in best.items()}
        decoding.append([f"{side} x {side}", ms["PNG library"], ms["PNG libpng"],
                         f"{ms['PNG libpng'] / ms['PNG library']:.2f}x", ms["PNG Pillow"],
                         f"{ms['PNG Pillow'] / ms['PNG library']:.2f}x", ms["JPEG library"], ms["JPEG Pillow"],
                         f"{ms['JPEG Pillow'] / ms['JPEG library']:.2f}x", "yes" if same else "NO"])
        reference = pillow_prepare(image, identity.image_size, mean, std, None)
        difference = np.abs(prepare(image, identity).numpy() - reference)
        resizing.append([f"{side} x {side}"] + [cell for kind in ("", "+thumbnail") for cell in (
            best[f"compiled{kind}"] * 1e3, best[f"Pillow{kind}"] * 1e3,
            f"{best[f'Pillow{kind}'] / best[f'compiled{kind}']:.1f}x")] + [f"{difference.max():.1e}"])
    grey = []
    for side in (448, 2448):
        picture = source.convert("L").resize((side, side), Image.Resampling.BICUBIC)
        stream, png_stream = io.BytesIO(), io.BytesIO()
        picture.save(stream, "JPEG", quality=95)
        picture.save(png_stream, "PNG")
        data, png_data = stream.getvalue(), png_stream.getvalue()
        best = best_times({"grey": lambda: prepare(load_pixels(data, keep_grey=True), identity),
                           "rgb": lambda: prepare(load_pixels(data), identity),
                           "png": lambda: load_pixels(png_data, keep_grey=True),
                           "png libpng": lambda: imagecodecs.png_decode(png_data),
                           "png Pillow": lambda: pillow_decode(png_data)}, repeats)
        same = torch.equal(prepare(load_pixels(data, keep_grey=True), identity), prepare(load_pixels(data), identity))
        same_png = np.array_equal(load_pixels(png_data, keep_grey=True), imagecodecs.png_decode(png_data))
        ms = {key: value * 1e3 for key, value in best.items()}
        grey.append([f"{side} x {side}", ms["grey"], ms["rgb"], f"{ms['rgb'] / ms['grey']:.1f}x",
                     "yes" if same else "NO", ms["png"], ms["png libpng"], f"{ms['png libpng'] / ms['png']:.2f}x",
                     ms["png Pillow"], "yes" if same_png else "NO"])
    where = f"{Path(path).name} and it enlarged, ms on one thread (best of {repeats}, in turns)"
    table(f"Decoding one image: the library (anomaly.png for plain PNGs, libjpeg-turbo through imagecodecs for "
          f"plain JPEGs) against libpng through imagecodecs and Pillow alone; {where}",
          ["image", "PNG", "PNG, libpng", "faster", "PNG, Pillow", "faster", "JPEG (quality 95)", "JPEG, Pillow",
           "faster", "same pixels"], decoding)
    table(f"Preparing one image for {args.backbone} ({identity.image_size} px input, {THUMBNAIL_SIZE} px thumbnail): "
          f"anomaly.resample against Pillow's resize of one float32 channel at a time; {where}",
          ["image", "compiled", "Pillow", "faster", "with thumbnail", "Pillow", "faster", "max |difference|"], resizing)
    table(f"A grey JPEG decoded and prepared, kept grey (the library) against repeated into RGB first; the same "
          f"picture as a grey PNG decoded by the library, libpng and Pillow (as RGB); {where}",
          ["image", "JPEG kept grey", "as RGB", "faster", "same input", "grey PNG", "libpng", "faster", "Pillow",
           "same pixels"], grey)


def section_throughput(args) -> None:
    data = category(args)
    fitted = model(args, calibration_images=0)
    extractor = fitted.extractor
    items = data.train[: args.throughput_images]
    tests = [entry.item for entry in data.test][: args.throughput_images]
    decoded = [load(item, extractor.identity).tensor for item in items]
    batches = [torch.stack(decoded[i : i + args.batch]).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(decoded), args.batch)]

    def bare() -> None:
        with torch.inference_mode():
            for x in batches:
                extractor(x)

    thumbnails = np.empty((len(items), THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)

    def decode() -> None:  # as bank building decodes: a batch at a time, on as many threads as the forward uses
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            for start in range(0, len(items), args.batch):
                indices = range(start, min(start + args.batch, len(items)))
                list(pool.map(lambda i: load(items[i], extractor.identity, thumbnails[i]), indices))

    builds: list[tuple[float, float]] = []  # (wall, of which in run_backbone) of each bank build

    def build() -> None:
        in_forward = 0.0

        def timed(*arguments, **options):
            nonlocal in_forward
            start = time.perf_counter()
            try:
                return run_backbone(*arguments, **options)
            finally:
                in_forward += time.perf_counter() - start

        start = time.perf_counter()
        with mock.patch.object(features, "run_backbone", timed):
            fitted.fit(items)
        builds.append((time.perf_counter() - start, in_forward))

    repeats = max(args.repeats, 5)  # the forward's own speed wanders by a third on a shared machine
    times = times_in_turns({"bare": bare, "decode": decode, "build": build,
                            "score": lambda: sum(1 for _ in fitted.score(tests))}, repeats + 1)
    times = {name: seconds[1:] for name, seconds in times.items()}  # the first round warms caches up
    best = {name: min(seconds) for name, seconds in times.items()}
    build_wall, build_forward = min(builds[1:])
    in_turn = best["bare"] + best["decode"]

    def of_bare(name: str, scale: float = 1.0) -> str:
        """The best times' ratio, and the median and range of each round's own ratio."""
        rounds = [bare / other * scale for bare, other in zip(times["bare"], times[name])]
        return (f"{best['bare'] / best[name] * scale:.2f} (rounds: {np.median(rounds):.2f}, "
                f"{min(rounds):.2f}-{max(rounds):.2f})")

    rows = [["bare forward (decoded batches)", 1e3 * best["bare"] / len(items), len(items) / best["bare"], "1"],
            ["decoding alone (decode threads, with thumbnails)", 1e3 * best["decode"] / len(items),
             len(items) / best["decode"], "-"],
            ["decoding, then the forward (the two rows above added)", 1e3 * in_turn / len(items),
             len(items) / in_turn, f"{best['bare'] / in_turn:.2f}"],
            ["bank build (decode + forward + spill)", 1e3 * best["build"] / len(items), len(items) / best["build"],
             of_bare("build")],
            ["... of which the forward passes (its fastest run)", 1e3 * build_forward / len(items), "-", "-"],
            ["... of which decoding and the rest", 1e3 * (build_wall - build_forward) / len(items), "-", "-"],
            ["image-level scoring (decode + forward + kNN)", 1e3 * best["score"] / len(tests),
             len(tests) / best["score"], of_bare("score", len(tests) / len(items))]]
    table(f"Throughput: {args.backbone}, batch {args.batch}, {len(items)} train / {len(tests)} test images of "
          f"{Path(args.dataset).name} ({repeats} rounds of every stage in turns; best times; build without "
          f"calibration maps)", ["stage", "ms per image", "images / s", "of bare forward"], rows)


def section_memory(args) -> None:
    data = category(args)
    fitted = model(args, calibration_images=0).fit(data.train)
    bank = fitted.bank
    tests = [entry.item for entry in data.test]
    rows = []
    for count in (args.batch, 4 * args.batch, 16 * args.batch):
        items = [tests[i % len(tests)] for i in range(count)]
        with PeakRSS() as rss:
            for result in fitted.score(items, maps=True):
                result.anomaly_map = None  # a streaming consumer keeps what it needs, not every map
        rows.append([count, mib(rss.start_private), mib(rss.peak_private), mib(rss.peak)])
    table(f"Memory while scoring with maps, one run after another: {args.backbone}, batch {args.batch}, bank of "
          f"{len(bank)} ({mib(bank.nbytes())}, {bank.nbytes() / len(bank) / 2**20:.2f} MiB per normal image)",
          ["images scored", "private RSS before", "peak private RSS", "peak RSS incl. mapped bank"], rows)


def section_scaling(args) -> None:
    extractor = model(args).extractor
    channels, dim = extractor.pyramid_channels, extractor.global_dim
    side = extractor.identity.image_size // 4
    rng = np.random.default_rng(0)
    pool = [[rng.normal(size=(c, -(-side // s), -(-side // s))).astype(np.float16) for c, s in zip(channels, (1, 2, 4))]
            for _ in range(8)]
    query = [torch.from_numpy(level.astype(np.float32)) for level in pool[0]]
    rows = []
    for size in args.scaling_sizes:
        spill = PyramidSpill()
        for start in range(0, size, 64):
            spill.append([torch.from_numpy(np.stack([pool[i % 8][level] for i in range(start, min(size, start + 64))]))
                          for level in range(len(channels))])
        pyramid = spill.finish()
        features = rng.normal(size=(size, dim)).astype(np.float32)
        index = search.build_index(features)
        probe = rng.normal(size=(16, dim)).astype(np.float32)
        neighbours = index.search(probe, min(args.k, size))[1]
        times = best_times({
            "image": lambda: index.search(probe, min(args.k, size)),
            "pixel": lambda: search.pyramid_knn(query, pyramid, neighbours[0], args.kappa),
        }, args.repeats)
        rows.append([size, times["image"] / len(probe) * 1e3, times["pixel"],
                     mib(sum(level.nbytes for level in pyramid))])
        del pyramid
    table(f"Scaling with the bank size: {args.backbone} channels {channels}, synthetic features, K={args.k}",
          ["normal images", "image-level ms / query", "pixel-level s / image", "bank pyramid on disk"], rows)


def section_bank5000(args) -> None:
    with tempfile.TemporaryDirectory(prefix="spade-bench-") as root:
        start = time.perf_counter()
        folder = make_demo_dataset(Path(root) / "synthetic", n_train=args.synthetic, n_test_good=4, n_test_defect=8)
        made = time.perf_counter() - start
        data = load_mvtec_category(folder)
        fitted = model(args, calibration_images=0)
        with PeakRSS() as build:
            start = time.perf_counter()
            fitted.fit(data.train)
            built = time.perf_counter() - start
        bank = fitted.bank
        with PeakRSS() as score:
            start = time.perf_counter()
            for _ in fitted.score([entry.item for entry in data.test], maps=True):
                pass
            scored = (time.perf_counter() - start) / len(data.test)
    table(f"Bank of {len(bank)} generated normal images ({args.backbone}, {bank.identity.weights}; "
          f"{made:.0f} s to generate them)",
          ["stage", "seconds", "peak private RSS", "peak RSS incl. mapped bank", "bank size", "per normal image"],
          [["build", built, mib(build.peak_private), mib(build.peak), mib(bank.nbytes()),
            f"{bank.nbytes() / len(bank) / 2**20:.2f} MiB"],
           [f"score {len(data.test)} with maps (per image)", scored, mib(score.peak_private), mib(score.peak), "", ""]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] + " Sections: see the module docstring.")
    parser.add_argument("--dataset", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/magnetic_tile"),
                        help="a category in the MVTec AD layout (default: %(default)s)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="the feature extractor (default: %(default)s)")
    parser.add_argument("--weights", default=None, help='a weights file, or "random" (timing only)')
    parser.add_argument("--section", action="append", choices=SECTIONS, help="repeatable; default all but bank5000")
    parser.add_argument("--k", type=int, default=50, help="nearest normal images (default: %(default)s)")
    parser.add_argument("--kappa", type=int, default=1, help="nearest gallery pixels per pixel (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--train", type=int, default=0, help="use this many training images (default 0: all)")
    parser.add_argument("--test", type=int, default=5, help="test images timed for pixel maps (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats, the best kept (default: %(default)s)")
    parser.add_argument("--throughput-images", type=int, default=96,
                        help="images timed in the throughput section (default: %(default)s)")
    parser.add_argument("--scaling-sizes", type=int, nargs="+", default=[100, 1000, 5000],
                        help="bank sizes in the scaling section (default: %(default)s)")
    parser.add_argument("--synthetic", type=int, default=500,
                        help="generated normal images for bank5000 (default: %(default)s)")
    parser.add_argument("--avx2", action="store_true",
                        help="time the code an AVX2 CPU without AVX-512 runs (most laptops): numba compiles for "
                             "Haswell, torch's kernels stop at AVX2; float32 ranking is then the default")
    args = parser.parse_args(argv)
    if args.avx2 and os.environ.get("NUMBA_CPU_NAME") != tiledot.AVX2_ONLY["NUMBA_CPU_NAME"]:
        # numba and torch read these when they load: run the bench again in a process that starts with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_KERNELS, **tiledot.AVX2_ONLY})
    threads = configure_threads()
    print("$ python " + " ".join(sys.argv))
    print(f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
          f"bf16 {'native' if default_precision(args) == 'bf16' else 'not native'}, "
          f"{'compiled as for an AVX2 CPU without AVX-512, ' if args.avx2 else ''}"
          f"pixel search by default: {search.describe(default_precision(args))}, "
          f"allocator: {', '.join(allocator.applied) or 'system default'}, "
          f"OpenMP spin count {os.environ.get('GOMP_SPINCOUNT', 'default')}"
          f"{' (set by anomaly)' if openmp.applied else ''}, load average {os.getloadavg()[0]:.2f}")
    for name in args.section or SECTIONS[:-1]:
        globals()[f"section_{name}"](args)
        print(f"(load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
