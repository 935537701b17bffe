"""Give the C heap's free pages back to the operating system.

Serving allocates and frees a lot outside torch's tensors (tokenizers, big request bodies, per-step buffers).
glibc keeps freed memory in its arenas, one per thread that allocated, so the process's RSS only grows: after a
burst of large requests a CPU server would keep the burst's peak forever, eating the headroom the memory plan
promised. `trim_free_heap` asks glibc to return every free page (`malloc_trim(0)`, all arenas); the engine calls
it when it goes idle after work. A no-op where glibc is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        return ctypes.CDLL("libc.so.6").malloc_trim
    return None


def trim_free_heap() -> bool:
    """Return glibc's free heap pages to the OS; True when it ran (glibc present)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
