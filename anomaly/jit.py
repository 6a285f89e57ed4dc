"""How the package compiles its loops: numba, cached on disk where it can be."""

from __future__ import annotations

import numba


def compiled(**options):
    """``numba.njit(**options)``, cached on disk where numba finds a writable place (beside the
    function's file, or the user's cache directory), else compiled in memory at every start: a
    read-only install run by a user without a writable home must not fail at import."""
    def decorate(function):
        try:
            return numba.njit(cache=True, **options)(function)
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            return numba.njit(**options)(function)
    return decorate
