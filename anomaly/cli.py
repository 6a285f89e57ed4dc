"""``python -m anomaly fit | score | evaluate``: the command line, a thin layer over the library.

Errors are one line on stderr (``error: <file>: <reason>``), never a traceback; an
unreadable input gets its row and a non-zero exit status, but never stops a batch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import search
from .backbones import BACKBONES, WeightsUnavailable
from .bank import BankError, NormalBank
from .datasets import load_mvtec_category
from .evaluation import evaluate
from .postprocess import check_threshold
from .sources import collect_inputs, safe_join
from .spade import IMAGE_SCORES, SPADE

EXIT_OK, EXIT_INPUT_ERRORS, EXIT_FAILED = 0, 1, 2
# The pixel search's loops compile on a machine's first run (about 20 s, then 0.2 s from numba's disk
# cache): said only when preparing them takes longer than this, so a first run's pause is not taken for a hang.
COMPILE_NOTICE_AFTER_S = 3.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # one line each, like the command's other messages
        warnings.showwarning = lambda message, *_, **__: _say(f"warning: {message}")
        try:
            return args.run(args)
        except (BankError, WeightsUnavailable, ValueError, OSError, RuntimeError) as exc:
            _say(f"error: {exc}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            _say("interrupted")
            return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anomaly",
        description="SPADE anomaly detection and localisation from normal images only.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="build a normal bank from normal images")
    fit.add_argument("train", nargs="+", help="normal images: files, folders (recursive) or .zip archives")
    fit.add_argument("--bank", required=True, help="where to save the bank (e.g. bank.safetensors)")
    _model_options(fit, backbone_default="auto")
    fit.set_defaults(run=run_fit)

    score = commands.add_parser("score", help="score images against a saved bank")
    score.add_argument("images", nargs="+", help="test images: files, folders (recursive) or .zip archives")
    score.add_argument("--bank", required=True, help="a bank saved by 'fit'")
    score.add_argument("--tau", type=float, default=None, help="image threshold (default: the bank's suggestion)")
    score.add_argument("--maps", default=None, help="folder for per-image anomaly maps (.npy, float32, H x W)")
    score.add_argument("--out", default="scores.csv", help="CSV of path,score,anomalous,error (default scores.csv)")
    _model_options(score, backbone_default="auto")
    score.set_defaults(run=run_score)

    ev = commands.add_parser("evaluate", help="fit and evaluate on MVTec-AD-layout category folders")
    ev.add_argument("categories", nargs="+", help="folders with train/good, test/<type>, ground_truth/<type>")
    _model_options(ev, backbone_default="auto")
    ev.set_defaults(run=run_evaluate)
    return parser


def _model_options(parser: argparse.ArgumentParser, backbone_default: str) -> None:
    parser.add_argument("--backbone", choices=BACKBONES, default=backbone_default,
                        help="feature extractor (default auto: wide_resnet50_2 if its weights are available, "
                             "else efficientnet_lite0; with a bank: the bank's)")
    parser.add_argument("--weights", default=None, help="state-dict file for a torchvision backbone")
    parser.add_argument("--k", type=int, default=50, help="nearest normal images (default 50)")
    parser.add_argument("--kappa", type=int, default=1, help="nearest normal pixels per test pixel (default 1)")
    parser.add_argument("--image-score", choices=IMAGE_SCORES, default="knn",
                        help="knn: paper's kNN score (default); map-max: maximum of the pixel map")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="pixel-search ranking precision: auto = bf16 where the CPU has it natively, else "
                             "fp32 (bf16 elsewhere is emulated, many times slower); the neighbours and scores are "
                             "the exact fp32 ones either way")
    parser.add_argument("--batch-size", type=int, default=16, help="images per backbone batch (default 16)")


def _params(args: argparse.Namespace) -> dict:
    return dict(
        backbone=args.backbone, weights=args.weights, k=args.k, kappa=args.kappa,
        image_score=args.image_score, precision=args.precision, batch_size=args.batch_size,
    )


def _announce(model: SPADE) -> None:
    extractor = model.extractor
    if extractor.notice:
        _say(extractor.notice)
    identity = extractor.identity
    _say(f"backbone: {identity.name}, weights: {identity.weights}; pixel search: {search.describe(model.precision)}")


def _prepare_pixel_search(model: SPADE) -> None:
    """Compile (or load) the pixel search's loops before the first map, saying so if that takes a while."""
    notice = threading.Timer(COMPILE_NOTICE_AFTER_S, _say,
                             ["compiling the pixel search (first run on this machine, about 20 s; cached afterwards)"])
    notice.start()
    try:
        search.warm_up(model.precision)
    finally:
        notice.cancel()


def _progress(desc: str):
    """A tqdm bar on stderr, created on the first report so it knows its total."""
    bars: list[tqdm] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)
        if done >= total:
            bars[0].close()

    return update


def run_fit(args: argparse.Namespace) -> int:
    collection = collect_inputs(args.train)
    for message in collection.errors:
        _say(f"error: {message}")
    model = SPADE(**_params(args))
    _announce(model)
    if model.calibration_images:
        _prepare_pixel_search(model)
    model.fit(collection.items, progress=_progress("fit"))
    bank = model.bank
    for message in bank.skipped:
        _say(f"skipped: {message}")
    bank.save(args.bank)
    tau = bank.suggested_tau()
    _say(f"saved {args.bank}: {len(bank)} normal images, {bank.nbytes() / 2**20:.1f} MiB, "
         f"suggested tau {_fmt(tau)}, suggested theta {_fmt(bank.suggested_theta())}")
    return EXIT_INPUT_ERRORS if collection.errors or bank.skipped else EXIT_OK


def run_score(args: argparse.Namespace) -> int:
    tau = check_threshold(args.tau, "--tau")
    bank = NormalBank.load(args.bank)
    model = SPADE.from_bank(bank, source=args.bank, **_params(args))
    _announce(model)
    if tau is None:
        tau = model.suggested_tau()
        if tau is None:
            _say("warning: this bank cannot suggest tau (a single normal image); 'anomalous' is left empty")
        else:
            _say(f"tau = {tau:.6g} (suggested by the bank)")
    collection = collect_inputs(args.images)
    for message in collection.errors:
        _say(f"error: {message}")
    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir is not None or model.image_score == "map-max":
        _prepare_pixel_search(model)
    failures = len(collection.errors)
    written: dict[Path, str] = {}
    out = Path(args.out)
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score", "anomalous", "error"])
        results = model.score(collection.items, maps=maps_dir is not None, progress=_progress("score"))
        for result in results:
            if result.error is not None:
                failures += 1
                _say(f"error: {result.error}")
                writer.writerow([result.path, "", "", result.error])
                continue
            if maps_dir is not None:
                _save_map(maps_dir, result, written)
            flag = result.anomalous(tau)
            writer.writerow([result.path, f"{result.score:.6g}", "" if flag is None else int(flag), ""])
            f.flush()
    _write_provenance(out, model, tau)
    _say(f"wrote {out}" + (f" and maps under {maps_dir}" if maps_dir else "") +
         (f"; {failures} input(s) could not be read" if failures else ""))
    return EXIT_INPUT_ERRORS if failures else EXIT_OK


def _save_map(maps_dir: Path, result, written: dict[Path, str]) -> None:
    """Save one map under its input's relative path; never overwrite another input's map of this run."""
    target = safe_join(maps_dir, str(Path(result.relpath).with_suffix(".npy")))
    if target in written:
        _say(f"warning: {result.path}: map not saved, {target} already holds the map of {written[target]}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, result.anomaly_map.astype(np.float32), allow_pickle=False)
    written[target] = result.path


def _write_provenance(out: Path, model: SPADE, tau: float | None) -> None:
    """A JSON file beside the CSV recording what produced it."""
    identity = model.bank.identity
    record = {
        "backbone": identity.name, "weights": identity.weights, "bank_fingerprint": model.bank.fingerprint,
        "k": model.k, "kappa": model.kappa, "image_score": model.image_score, "tau": tau,
        "sigma": model.sigma, "precision": search.resolve_precision(model.precision),
    }
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def run_evaluate(args: argparse.Namespace) -> int:
    reports = []
    for root in args.categories:
        category = load_mvtec_category(root)
        model = SPADE(**_params(args))
        _announce(model)
        _prepare_pixel_search(model)
        bars: dict[str, Callable[[int, int], None]] = {}

        def stage(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = _progress(f"{category.name} {name}")
            bars[name](done, total)

        report, _ = evaluate(category, model, stage)
        reports.append(report.to_dict())
    print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2, default=_json_default))
    return EXIT_OK


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
