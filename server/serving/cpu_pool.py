"""`CPUWorkPool`: request CPU work (tokenising, chat templates, detokenising) off the event loop, bounded.

A 1 MiB prompt takes seconds to tokenise; on the event loop it would stall every stream the server is sending.
The pool runs such work on a few threads (the tokenizers release the GIL while they work) and admits at most
`workers + max_queued` jobs at once: beyond that a request gets 429 with `Retry-After` instead of queueing
without bound. Jobs are counted until their thread finishes them, so a client that disconnects does not free
its slot before the work it queued is really gone.

`CPULanes` keeps two such pools: requests whose body is over `large_body_bytes` (64 KiB by default) are prepared on
a lane of their own, so a burst of 1 MiB prompts never queues a chat message behind it (measured with one FIFO
pool: new small requests waited ~16 s behind twenty 1 MiB `/tokenize` bodies, docs/benchmarks.md). The large
lane's threads run at the lowest CPU priority, so they use what the engine leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from fitserve.server.protocol.errors import APIError

P = ParamSpec("P")
T = TypeVar("T")

RETRY_AFTER_S = 1
# The large lane's threads run at the lowest priority: on a small CPU a thread tokenising a 1 MiB prompt otherwise takes
# a core from the engine's OpenMP team, whose barrier then waits for it every op (measured on 2 cores: a stream's
# ITL p50 31 -> 120 ms while twenty 1 MiB /tokenize bodies were tokenised at normal priority).
LARGE_LANE_NICE = 19


class CPUWorkPool:
    """A thread pool with a bounded backlog; `run` is awaited from the event loop only."""

    def __init__(self, workers: int, max_queued: int, nice: int = 0, name: str = "fitserve-cpu") -> None:
        if workers < 1 or max_queued < 0:
            raise ValueError(f"need workers >= 1 and max_queued >= 0, got {workers} and {max_queued}")
        initializer = functools.partial(_lower_thread_priority, nice) if nice > 0 else None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=initializer)
        self.capacity = workers + max_queued
        self.in_flight = 0  # changed on the event loop's thread only

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a pool thread in the caller's context; 429 `server_busy` if the backlog is full."""
        if self.in_flight >= self.capacity:
            raise APIError(
                429,
                "The server is busy preparing other requests; retry shortly.",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        context = contextvars.copy_context()  # the request id follows the work into the thread
        job: Future[T] = self._executor.submit(context.run, functools.partial(fn, *args, **kwargs))
        job.add_done_callback(lambda _: self._release_from_any_thread(loop))
        return await asyncio.wrap_future(job)

    def _release_from_any_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed: nobody counts any more
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        """Drop queued jobs and let the threads end once their current job returns (never blocks)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_thread_priority(nice: int) -> None:
    """Run the calling thread at a lower scheduling priority (Linux: per-thread nice; elsewhere a no-op)."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priorities here
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class CPULanes:
    """A pool for ordinary requests and one for large bodies, each bounded on its own."""

    def __init__(self, workers: int, max_queued: int, large_workers: int, large_body_bytes: int) -> None:
        self.small = CPUWorkPool(workers, max_queued)
        self.large = CPUWorkPool(large_workers, max_queued, nice=LARGE_LANE_NICE, name="fitserve-cpu-large")
        self.large_body_bytes = large_body_bytes

    def for_body(self, body_bytes: int | None) -> CPUWorkPool:
        """The lane of a request whose body is `body_bytes` long (None: unknown length, e.g. chunked: large)."""
        if body_bytes is None or body_bytes > self.large_body_bytes:
            return self.large
        return self.small

    def close(self) -> None:
        """Close both lanes (never blocks)."""
        self.small.close()
        self.large.close()
