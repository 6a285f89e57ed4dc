"""Memory allocator settings for the whole process, applied once when :mod:`anomaly` is imported.

Every batch through a backbone allocates and frees tens of MiB of activations. By default glibc's
malloc gives such blocks back to the kernel when they are freed, so the next batch faults the same
memory in again, zeroed, 4 KiB at a time: on the machine of the README's figures that was nearly
half the CPU time of an efficientnet_lite0 forward pass. glibc's ``mallopt`` keeps the memory for
reuse: blocks up to 32 MiB (its maximum) come from the heap instead of fresh mappings, the heap grows
64 MiB at a time, and it is trimmed only when 256 MiB at its top are free.

torch's transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``) are left off, as torch has them: on the
Xeon they made nothing faster once memory was in use, and cost seconds of system time while the process
first took its memory: scoring 83 images took 8.7 s instead of 5.7 (system time 5.1 s against 1.0, for
554 huge pages: about 7 ms each, probably a virtual machine's host backing memory on first use), and the
first batch of 16 through the backbone 1.6-2.9 s instead of 0.25-0.29 (docs/performance.md, "Huge pages
dropped").

The price is that up to 256 MiB of freed memory stays with the process. ``ANOMALY_ALLOCATOR=system``
(set before the import) keeps glibc's defaults; ``MALLOC_*`` or ``GLIBC_TUNABLES`` already set by the
user are left as they are, and other C libraries (macOS, musl) are not touched.
"""

from __future__ import annotations

import ctypes
import os
import platform

MIB = 1 << 20
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = {_M_MMAP_THRESHOLD: 32 * MIB, _M_TOP_PAD: 64 * MIB, _M_TRIM_THRESHOLD: 256 * MIB}
_USER_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

applied: tuple[str, ...] | None = None
"""What :func:`configure_allocator` changed (``"glibc malloc keeps freed memory"``, or nothing); None
before it ran."""


def configure_allocator() -> tuple[str, ...]:
    """Apply the settings above once per process; returns what was changed (also in :data:`applied`)."""
    global applied
    if applied is not None:
        return applied
    if os.environ.get("ANOMALY_ALLOCATOR", "").lower() == "system":
        applied = ()
        return applied
    applied = ("glibc malloc keeps freed memory",) if _tune_glibc_malloc() else ()
    return applied


def _tune_glibc_malloc() -> bool:
    user_set = any(name in os.environ for name in _USER_MALLOC_VARIABLES)
    if user_set or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS.items())
