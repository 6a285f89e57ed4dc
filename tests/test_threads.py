"""Thread settings: decided once, and kept while the libraries run."""

import os
import subprocess
import sys
from pathlib import Path

THREADS_AFTER_A_SEARCH = """
import numpy as np, torch, anomaly
from anomaly import fused, search
from anomaly.threads import configure_threads
print(configure_threads())
rng = np.random.default_rng(0)
search.pixel_knn(torch.from_numpy(rng.normal(size=(50, 8)).astype(np.float32)),
                 torch.from_numpy(rng.normal(size=(300, 8)).astype(np.float32)), 1)
print(torch.get_num_threads(), fused._threads())
"""


def test_anomaly_threads_holds_after_the_compiled_loops_start():
    """numba's OpenMP pool, started by the first compiled loop, sets the thread count of the OpenMP
    runtime it shares with torch to its own (all cores): torch ran on every core although
    ANOMALY_THREADS said one."""
    env = {**os.environ, "ANOMALY_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", THREADS_AFTER_A_SEARCH], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    configured, (torch_threads, numba_threads) = done.stdout.split()[0], done.stdout.split()[1:3]
    assert (configured, torch_threads, numba_threads) == ("1", "1", "1")
