"""OpenMP's idle spinning: shortened for the runtime torch loads, unless the user chose otherwise.

Each case runs in a fresh interpreter, because libgomp reads its settings once, when it is loaded.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def runtime_spin_count(code: str, **env: str) -> tuple[str | None, str]:
    """The spin count the OpenMP runtime loaded by ``code`` reports (OMP_DISPLAY_ENV), and what
    `anomaly.openmp` recorded."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", code + "\nimport torch; torch.ones(4).sum()\n"
                           "from anomaly import openmp; print(openmp.applied)"],
                          cwd=ROOT, env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env},
                          capture_output=True, text=True, timeout=300, check=True)
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stdout + done.stderr)
    return (found.group(1) if found else None), done.stdout.strip().splitlines()[-1]


def test_importing_anomaly_first_shortens_the_spinning_of_torchs_runtime():
    assert runtime_spin_count("import anomaly") == ("30000", "True")


def test_the_users_own_choice_is_left_alone():
    assert runtime_spin_count("import anomaly", GOMP_SPINCOUNT="300000") == ("300000", "False")
    assert runtime_spin_count("import anomaly", OMP_WAIT_POLICY="ACTIVE")[1] == "False"


def test_nothing_changes_when_torch_was_loaded_first():
    assert runtime_spin_count("import torch; import anomaly") == ("300000", "False")
