"""The allocator settings: memory freed by one batch is reused by the next instead of being
faulted in again, and users' own settings win.

Each case runs in a fresh interpreter, because the settings are process-wide and applied at import.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, resource
import anomaly
from anomaly import allocator
import torch

def one_pass():  # a batch's activations: several large blocks alive at once, then all freed
    live = [torch.empty(size << 20, dtype=torch.uint8).fill_(1) for size in (16, 8, 24, 4, 12)]
    del live

for _ in range(5):
    one_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    one_pass()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "applied": list(allocator.applied),
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""
PAGES_PER_PASS = (16 + 8 + 24 + 4 + 12) << 20 >> 12  # 4 KiB pages

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the malloc settings apply to glibc only")


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ANOMALY_ALLOCATOR", "THP_MEM_ALLOC_ENABLE") and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_only
def test_repeated_passes_reuse_memory_instead_of_faulting_it_in_again():
    tuned = probe()
    assert tuned["applied"] == ["glibc malloc keeps freed memory"]
    assert tuned["thp"] is None  # torch's huge pages stay off (see anomaly/allocator.py)
    assert tuned["faults"] < PAGES_PER_PASS / 16


@glibc_only
def test_users_own_settings_are_left_alone():
    # This user asks glibc to map every block above 128 KiB afresh: the control that shows the
    # probe sees memory being faulted in again on every pass.
    result = probe(THP_MEM_ALLOC_ENABLE="0", MALLOC_MMAP_THRESHOLD_="131072")
    assert result["applied"] == []
    assert result["thp"] == "0"
    assert result["faults"] > 10 * PAGES_PER_PASS / 2


@glibc_only
def test_system_allocator_on_request():
    # glibc's own dynamic thresholds fault some runs and not others, so only the settings are checked.
    result = probe(ANOMALY_ALLOCATOR="system")
    assert result["applied"] == [] and result["thp"] is None
