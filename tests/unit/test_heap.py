"""`quant.heap.trimming_free_heap`: trims from a helper thread while its block runs, and stops with the block."""

from __future__ import annotations

import threading
import time

import pytest

from fitserve.quant import heap


def test_trimming_free_heap_trims_while_the_block_runs_and_stops_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_libc", lambda: object())  # a C library stands in; `trim_free_heap` itself is recorded
    calls: list[str] = []
    monkeypatch.setattr(heap, "trim_free_heap", lambda: calls.append(threading.current_thread().name) or True)
    with heap.trimming_free_heap(interval_s=0.01):
        deadline = time.monotonic() + 5
        while calls.count("heap-trim") < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert calls.count("heap-trim") >= 3  # trimmed repeatedly from its own thread while the block ran
    assert calls[-1] == threading.current_thread().name  # and once more at the end, on the caller's thread
    after = len(calls)
    time.sleep(0.05)
    assert len(calls) == after  # the helper thread stopped with the block
    assert not any(t.name == "heap-trim" for t in threading.enumerate())
