"""How long OpenMP's idle threads spin before they sleep, set once before torch loads its OpenMP runtime.

torch's parallel loops (and numba's and faiss's, where they use libgomp) run on libgomp, whose idle
worker threads spin for 300,000 rounds before they sleep, so that the next loop starts without
waking them. Bank building and scoring alternate a batch's decoding, on Python threads, with the
backbone's forward pass, and after every forward pass a worker spun on a core the decode threads
needed: a build's decoding took up to half as long again as decoding alone (1.9 against 1.2 ms
per image). A tenth of the rounds is still far longer than the gaps between the loops of one
forward pass or pixel search, which ran as fast as before (``python bench/bench.py --section
throughput`` and ``--section pixel``; ``GOMP_SPINCOUNT=300000`` in front of them restores
libgomp's default).

``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set by the user are left as they are. libgomp reads them
when it is loaded, so this only takes effect when :mod:`anomaly` is imported before torch.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 30_000

applied: bool | None = None
"""Whether :func:`configure_spinning` set the spin count; None before it ran."""


def configure_spinning() -> bool:
    """Set libgomp's spin count to :data:`SPIN_COUNT` unless the user chose one or torch is loaded."""
    global applied
    if applied is None:
        chosen = "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
        applied = not chosen and "torch" not in sys.modules
        if applied:
            os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return applied
