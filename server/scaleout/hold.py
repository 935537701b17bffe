"""Late binding: hold a request while no replica has KV room for it, one FIFO queue for all replicas (no Ray here).

A request routed at once to a replica without room waits in that replica's queue even when another replica frees
room first. `RoomWaiter.hold` instead keeps it in one first-come-first-served queue: the oldest held request re-ranks
the replicas each time a routed request finishes (`room_freed`) and at least every `recheck_s` (stats refresh,
replicas come and go), and leaves with the first ranking in which some replica has room for it, or the last one after
`max_hold_s`, or as soon as it no longer fits any replica at all. While any request is held, newer ones queue behind
it even when a smaller gap would take them (otherwise short requests keep overtaking a long one, whose latency is the
tail).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fitserve.server.scaleout.routing import RoutingDecision

HOLD_RECHECK_S = 0.05


def _must_wait(decision: RoutingDecision) -> bool:
    """No replica has room for the request now, but one is large enough to hold it."""
    return decision.could_fit and not decision.has_room


@dataclass
class RoomWaiter:
    """Holds requests, oldest first, until a ranking has room; `held` counts the requests waiting now."""

    max_hold_s: float
    recheck_s: float = HOLD_RECHECK_S
    _queue: deque[object] = field(default_factory=deque)
    _wakeups: set[asyncio.Future[None]] = field(default_factory=set)

    @property
    def held(self) -> int:
        """Requests held now."""
        return len(self._queue)

    def should_hold(self, decision: RoutingDecision) -> bool:
        """Holding is on, the request fits some replica, and it has to wait: no room now, or older requests held."""
        return self.max_hold_s > 0 and decision.could_fit and (not decision.has_room or bool(self._queue))

    def room_freed(self) -> None:
        """A routed request finished (or a replica went away): the oldest held request re-ranks now."""
        for wakeup in self._wakeups:
            if not wakeup.done():
                wakeup.set_result(None)
        self._wakeups.clear()

    async def hold(self, rank: Callable[[], RoutingDecision | None]) -> tuple[RoutingDecision | None, float]:
        """Queue behind the requests held before this one, then re-rank with `rank` (None: no replicas listed right
        now) until a ranking has room or cannot fit, or `max_hold_s` passed; returns the last ranking (None if none
        was made) and the seconds held."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        decision: RoutingDecision | None = None
        ticket = object()
        self._queue.append(ticket)
        try:
            while time.monotonic() - started < self.max_hold_s:
                # registered before the next await: a room_freed() after the last ranking cannot be missed
                wakeup: asyncio.Future[None] = loop.create_future()
                self._wakeups.add(wakeup)
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wakeup, self.recheck_s)
                finally:
                    self._wakeups.discard(wakeup)
                if self._queue[0] is not ticket:
                    continue  # an older request goes first
                decision = rank()
                if decision is not None and not _must_wait(decision):
                    break
        finally:
            self._queue.remove(ticket)
            self.room_freed()  # the next request in line checks at once
        if decision is None:
            decision = rank()
        return decision, time.monotonic() - started
