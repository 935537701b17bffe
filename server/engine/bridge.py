"""The async client bridge: how requests cross from the asyncio event loop to the engine thread and back.

Event-loop side: `submit` puts a group of sequences (the choices of one HTTP request) into a locked inbox and
gives each an `asyncio.Queue`; `stream` reads one request's outputs from its queue and aborts the request if the
consumer stops early; `request_abort` queues an abort. Engine-thread side: `drain` takes the inbox and the aborts,
`deliver` hands outputs (and admission outcomes) back to the event loop with one `call_soon_threadsafe` per step.
Plain Python, no torch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fitserve.server.engine.scheduler import Sequence as EngineSequence
from fitserve.server.engine.types import InvalidRequestError, RequestOutput

logger = logging.getLogger(__name__)

OutputQueue = asyncio.Queue  # of RequestOutput | BaseException
# (where to, what): a request's output queue gets outputs or errors; a group's admission future gets None or an
# error; a None target (the request already left) drops the item.
Delivery = tuple[Any, Any]


@dataclass(frozen=True)
class PendingGroup:
    """Sequences submitted together, their output queues, and the future that says whether the engine admitted
    them (all or none)."""

    seqs: tuple[EngineSequence, ...]
    queues: tuple[OutputQueue, ...]
    admitted: asyncio.Future[None]


class RequestBridge:
    """The inbox, the per-request output queues and the delivery of outputs to the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[PendingGroup] = []
        self._aborts: list[str] = []
        self._queues: dict[str, OutputQueue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to `loop` from now on (the loop that runs the HTTP server)."""
        self._loop = loop

    # ---- event-loop side -------------------------------------------------------------------------------------

    def submit(self, seqs: Sequence[EngineSequence]) -> PendingGroup:
        """Queue a group for the engine thread; raises `InvalidRequestError` for a request id already in flight."""
        loop = asyncio.get_running_loop()
        group = PendingGroup(tuple(seqs), tuple(asyncio.Queue() for _ in seqs), loop.create_future())
        ids = [seq.request_id for seq in seqs]
        with self._lock:
            duplicate = next((i for n, i in enumerate(ids) if i in self._queues or i in ids[:n]), None)
            if duplicate is not None:
                raise InvalidRequestError(f"Request id {duplicate!r} is already in flight.")
            self._queues.update(zip(ids, group.queues, strict=True))
            self._inbox.append(group)
        self._wake.set()
        return group

    def output_queue(self, request_id: str) -> OutputQueue | None:
        """The output queue of a request in flight."""
        with self._lock:
            return self._queues.get(request_id)

    async def stream(self, request_id: str, queue: OutputQueue) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs until the finished one; an error item is raised. Aborts if closed early."""
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.request_abort(request_id)

    def request_abort(self, request_id: str) -> None:
        """Ask the engine thread to abort a request; unknown ids are ignored."""
        with self._lock:
            if request_id in self._queues:
                self._aborts.append(request_id)
        self._wake.set()

    @property
    def has_requests(self) -> bool:
        """True while any request is in flight (submitted and not yet finished)."""
        return bool(self._queues)

    @property
    def num_submitted(self) -> int:
        """Sequences submitted but not yet taken by the engine thread."""
        with self._lock:
            return sum(len(group.seqs) for group in self._inbox)

    # ---- engine-thread side ----------------------------------------------------------------------------------

    def drain(self) -> tuple[list[PendingGroup], list[str]]:
        """Take everything submitted and every abort asked for since the last call."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        return inbox, aborts

    def pop(self, request_id: str) -> OutputQueue | None:
        """Forget a request that is leaving the engine; returns its queue for the last delivery."""
        with self._lock:
            return self._queues.pop(request_id, None)

    def wait(self, timeout_s: float) -> None:
        """Sleep until new work or an abort arrives, or `timeout_s` passes."""
        self._wake.wait(timeout_s)
        self._wake.clear()

    def wake(self) -> None:
        """Wake the engine thread (e.g. to notice shutdown)."""
        self._wake.set()

    def deliver(self, deliveries: list[Delivery]) -> None:
        """Hand outputs to the event loop in one callback."""
        if deliveries and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the event loop closed under us (process shutdown)
                logger.debug("event loop closed; %d outputs dropped", len(deliveries))


def _put_all(deliveries: list[Delivery]) -> None:
    for target, item in deliveries:
        if isinstance(target, asyncio.Future):
            if target.done():  # the submitter was cancelled while it waited
                continue
            if isinstance(item, BaseException):
                target.set_exception(item)
            else:
                target.set_result(None)
        elif target is not None:
            target.put_nowait(item)
