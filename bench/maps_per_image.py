"""End-to-end seconds per image of SPADE.score with pixel maps (backbone + K=50 pixel search + post-processing).

    python bench/maps_per_image.py ../shared/datasets/mvtec_bottle_448
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomaly.datasets import load_mvtec_category  # noqa: E402
from anomaly.spade import SPADE  # noqa: E402

category = load_mvtec_category(sys.argv[1] if len(sys.argv) > 1 else "../shared/datasets/mvtec_bottle_448")
model = SPADE(backbone="efficientnet_lite0", calibration_images=0).fit(category.train[:60])
items = [entry.item for entry in category.test[:6]]
list(model.score(items[:1], maps=True))  # warm-up
for precision in ("fp32", "bf16"):
    model.precision = precision
    started = time.perf_counter()
    list(model.score(items, maps=True))
    print(f"{precision}: {(time.perf_counter() - started) / len(items):.3f} s per image with maps (K=50, kappa=1)")
