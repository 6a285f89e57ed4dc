"""End-to-end seconds per image of SPADE.score with pixel maps, with float32 and bfloat16 ranking in one run.

Each image: the backbone, the image-level kNN, the pixel search against its K = 50 nearest normal images and
the maps' post-processing.

    python bench/maps_per_image.py ../shared/datasets/mvtec_bottle_448
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.datasets import load_mvtec_category  # noqa: E402
from anomaly.spade import SPADE  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset", nargs="?", default="../shared/datasets/mvtec_bottle_448",
                        help="a category in the MVTec AD layout (default: %(default)s)")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="the feature extractor (default: %(default)s)")
    parser.add_argument("--train", type=int, default=60, help="normal images in the bank (default: %(default)s)")
    parser.add_argument("--test", type=int, default=6, help="test images scored (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        category = load_mvtec_category(args.dataset)
    except ValueError as error:
        parser.error(str(error))
    model = SPADE(backbone=args.backbone, calibration_images=0).fit(category.train[: args.train])
    items = [entry.item for entry in category.test[: args.test]]
    list(model.score(items[:1], maps=True))  # warm-up
    for precision in ("fp32", "bf16"):
        model.precision = precision
        started = time.perf_counter()
        list(model.score(items, maps=True))
        print(f"{precision}: {(time.perf_counter() - started) / len(items):.3f} s per image with maps "
              f"(K={min(model.k, len(model.bank))}, kappa={model.kappa}, bank of {len(model.bank)})")


if __name__ == "__main__":
    main()
