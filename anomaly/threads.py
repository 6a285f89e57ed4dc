"""Thread settings for torch and faiss, decided once for the whole process.

Both libraries default to one thread per core, and several dashboard sessions
computing at once would then oversubscribe the machine many times over. So the
process uses ``ANOMALY_THREADS`` (default: the cores it may run on) threads per
library (the pixel search's compiled loops, :mod:`anomaly.fused`, follow torch's
count), and heavy work from concurrent callers queues on :data:`compute_lock`
instead of competing for the same cores.
"""

from __future__ import annotations

import os
import threading

import faiss
import numba
import torch

compute_lock = threading.Lock()
"""Held around feature extraction and nearest-neighbour search in shared processes."""

_configured: int | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set torch and faiss thread counts once; later calls without an argument keep it."""
    global _configured
    if threads is None and _configured is not None:
        return _configured
    if threads is None:
        threads = int(os.environ.get("ANOMALY_THREADS", "0")) or available_cores()
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    # numba's OpenMP pool, when it starts, sets the thread count of the OpenMP runtime it shares
    # with torch to its own (all cores); started first, torch's setting below is the one that holds.
    numba.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    _configured = threads
    return threads
