"""The allocator settings: repeated forward passes stop faulting memory in, and users' own settings win.

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

net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
x = torch.rand(8, 3, 112, 112)  # 12.8 MB activations: glibc's default maps and unmaps them every pass
with torch.inference_mode():
    for _ in range(6):  # the heap grows to its working size
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        net(x)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "applied": list(allocator.applied),
                  "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""

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
    tuned, system = probe(), probe(ANOMALY_ALLOCATOR="system")
    assert tuned["applied"] == ["glibc malloc keeps freed memory", "huge pages"]
    assert tuned["thp"] == "1"
    assert system["applied"] == [] and system["thp"] is None
    assert system["faults"] > 2000, "control: the default allocator should keep faulting the activations in"
    assert tuned["faults"] < system["faults"] / 4


@glibc_only
def test_users_own_settings_are_left_alone():
    result = probe(THP_MEM_ALLOC_ENABLE="0", MALLOC_TRIM_THRESHOLD_="131072")
    assert result["applied"] == []
    assert result["thp"] == "0"
    assert result["faults"] > 2000  # glibc's own behaviour, as the user asked
