"""The bench script runs as the README shows it and its tables say what they should (tiny settings).

Only what could be wrong is asserted, never a timing: the tables are complete, the figures are numbers,
and the pixel section's own check, the library's distances against the naive reference's, holds.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from imagegen import DATASETS, requires_dataset

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(*args: str, script: str = "bench.py") -> tuple[dict[str, list[dict[str, str]]], str]:
    """Run a bench script in its own process, as a user would: its tables by title, each a list of rows, and
    all it printed."""
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tables: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in done.stdout.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
            tables[title] = []
        elif title is not None and line.startswith("|") and not line.startswith("|-"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            if header is None:
                header = cells
            else:
                assert len(cells) == len(header), line
                tables[title].append(dict(zip(header, cells)))
    return tables, done.stdout


def only(tables: dict[str, list[dict[str, str]]], prefix: str) -> list[dict[str, str]]:
    (rows,) = [rows for title, rows in tables.items() if title.startswith(prefix)]
    return rows


def test_scaling_and_bank_sections_on_synthetic_features():
    tables, _ = run_bench("--section", "scaling", "--section", "bank5000", "--scaling-sizes", "30", "60",
                          "--synthetic", "12", "--k", "5")
    scaling = only(tables, "Scaling with the bank size")
    assert [row["normal images"] for row in scaling] == ["30", "60"]
    for row in scaling:
        assert float(row["image-level ms / query"]) > 0 and float(row["pixel-level s / image"]) > 0
    bank = only(tables, "Bank of 12 generated normal images")
    assert [row["stage"].split()[0] for row in bank] == ["build", "score"]
    assert bank[0]["per normal image"].endswith("MiB") and float(bank[0]["per normal image"].split()[0]) > 0


@requires_dataset("magnetic_tile")
def test_pixel_section_matches_the_naive_reference():
    tables, printed = run_bench("--dataset", str(DATASETS / "magnetic_tile"), "--section", "pixel", "--train", "12",
                                "--test", "1", "--k", "5", "--repeats", "1")
    rows = only(tables, "Pixel maps")
    assert {row["path"].split(",")[0].split(":")[0] for row in rows} == {"naive", "stack pixels", "search"}
    searches = [row for row in rows if row["path"].startswith("search")]
    assert len(searches) == 2  # float32 and bfloat16 ranking
    for row in searches:
        # Exact float32 distances either way: only the naive path's own rounding (cdist's) separates them.
        assert float(row["max |d - naive| / naive"]) < 1e-4, row
        assert float(row["x naive"]) > 0
    # bfloat16 only ranks: both rankings return the same float32 distances.
    differ = re.search(r"bf16 against fp32 ranking: ([0-9.]+)% of pixel distances differ", printed)
    assert differ is not None and float(differ.group(1)) == 0, printed[-2000:]


@requires_dataset("mvtec_bottle_448")
def test_maps_per_image_reports_both_rankings():
    _, printed = run_bench(str(DATASETS / "mvtec_bottle_448"), "--train", "12", "--test", "2",
                           script="maps_per_image.py")
    found = re.findall(r"^(fp32|bf16): ([0-9.]+) s per image with maps \(K=12, kappa=1, bank of 12\)$", printed,
                       re.MULTILINE)
    assert [precision for precision, _ in found] == ["fp32", "bf16"], printed
    assert all(float(seconds) > 0 for _, seconds in found)


def test_a_missing_dataset_is_one_line():
    done = subprocess.run([sys.executable, str(BENCH / "bench.py"), "--dataset", "no/such/folder", "--section",
                           "pixel"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.strip() == ("bench: no/such/folder: not a folder "
                                   "(--dataset takes a category in the MVTec AD layout)")
