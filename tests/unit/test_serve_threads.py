"""Start-up work runs in threads that end (so the engine thread is the only OpenMP master), and the spare
budget that may hold a packed tied lm_head."""

from __future__ import annotations

import asyncio
import threading

import pytest

from fitserve.server.serve import run_in_short_lived_thread


def test_short_lived_thread_returns_the_result_and_is_gone() -> None:
    seen: list[threading.Thread] = []

    def work(a: int, b: int) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert asyncio.run(run_in_short_lived_thread(work, 2, 3)) == 5
    assert seen[0] is not threading.main_thread()
    assert not seen[0].is_alive()


def test_short_lived_thread_raises_what_the_work_raised() -> None:
    def fail() -> None:
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        asyncio.run(run_in_short_lived_thread(fail))
