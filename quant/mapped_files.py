"""Checkpoint files this process has memory-mapped: where they are, and giving their pages back.

A 16-bit model served in its checkpoint's dtype keeps viewing the safetensors file transformers mapped: its
weights are file pages, counted in RSS once touched. When the engine replaces such a weight by a copy in another
layout (oneDNN prepacking, `server/engine/cpu_linear.py`), the file pages would stay resident beside the copy and
double the weights' memory; `drop_file_pages` tells the kernel they are no longer needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
from functools import cache
from pathlib import Path

MADV_DONTNEED = 4  # linux/mman.h
PAGE = mmap.PAGESIZE


def mapped_file_ranges(suffix: str = ".safetensors", maps: Path = Path("/proc/self/maps")) -> list[tuple[int, int]]:
    """Address ranges of this process's memory-mapped files named `*suffix` (Linux; empty elsewhere)."""
    ranges = []
    try:
        for line in maps.read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[5].endswith(suffix):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                ranges.append((start, end))
    except OSError:
        return []
    return ranges


def in_ranges(address: int, ranges: list[tuple[int, int]]) -> bool:
    """True when `address` lies in one of `ranges`."""
    return any(start <= address < end for start, end in ranges)


@cache
def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError):  # not Linux/glibc
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if hasattr(libc, "madvise"):
            return libc
    return None


def drop_file_pages(address: int, nbytes: int, ranges: list[tuple[int, int]]) -> int:
    """Release the whole pages of `[address, address + nbytes)` from RSS (madvise MADV_DONTNEED) when that span
    lies inside one mapped checkpoint range of `ranges`; returns the bytes released (0: not file-backed, or no
    madvise here).

    Only ever file pages: the checkpoint is mapped read-only and never written, so a later read of the span (any
    tensor still viewing it) faults the same bytes back in from the file. Anonymous memory is never touched (there,
    DONTNEED would zero live data). The partial pages at either end, which may hold a neighbour, are kept.
    """
    end = address + nbytes
    if not any(start <= address and end <= stop for start, stop in ranges):
        return 0
    libc = _libc()
    first = -(-address // PAGE) * PAGE
    last = end // PAGE * PAGE
    if libc is None or last <= first:
        return 0
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) != 0:
        return 0
    return last - first
