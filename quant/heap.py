"""Give the C heap's free pages back to the operating system.

Serving allocates and frees a lot outside torch's tensors (tokenizers, big request bodies, per-step buffers).
glibc keeps freed memory in its arenas, so the process's RSS only grows: after a burst of large requests a CPU
server would keep the burst's peak forever, eating the headroom the memory plan promised.

* `trim_free_heap` asks glibc to return every free page (`malloc_trim(0)`); the engine calls it when it goes
  idle after work, the CPU load after it, and torch's weight-only quantizer after each Linear it converts (its
  temporaries, freed below live quantized buffers, otherwise piled up: the INT8 load of the default model peaked
  ~150-190 MiB higher in about one start in three, over the served budget).
* `use_one_heap_arena` makes every thread allocate from the main arena. By default glibc gives each thread that
  allocates its own arena, and trimming gives back far less of those: measured on the default model's tokenizer,
  two 1 MiB prompts tokenised on two pool threads left RSS 68 MiB higher after `malloc_trim` (the same work on
  the main thread, or with one arena: +0.4 MiB). `fitserve serve` calls it at start, before any thread exists.

* `trimming_free_heap` trims every 50 ms while a block runs: a CPU load around `from_pretrained`, whose quantizers
  (bitsandbytes) free a 16-bit copy of each weight as they go. Without it the NF4 load of the default model peaked
  between 842 and 1177 MiB in five starts (settled: ~660 MiB), the variable part freed heap kept by glibc, once
  over the served budget (1493 MiB against 1450 in CI).

All are no-ops where glibc is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from functools import cache

M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena cap (malloc.h)


@cache
def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError):  # not glibc
        libc = ctypes.CDLL("libc.so.6")
        if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt"):
            return libc
    return None


def use_one_heap_arena() -> bool:
    """Cap glibc at one malloc arena for threads that have not allocated yet; True when it was set."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_ARENA_MAX, 1))


def trim_free_heap() -> bool:
    """Return glibc's free heap pages to the OS; True when it ran (glibc present)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def trimming_free_heap(interval_s: float = 0.05) -> Iterator[None]:
    """Trim the free heap every `interval_s` from another thread while the block runs, and once at its end."""
    if _libc() is None:
        yield
        return
    done = threading.Event()

    def trim_until_done() -> None:
        while not done.wait(interval_s):
            trim_free_heap()

    thread = threading.Thread(target=trim_until_done, name="heap-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        trim_free_heap()
