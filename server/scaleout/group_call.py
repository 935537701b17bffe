"""One request group's call to an engine replica, seen from the ingress: admission, retries, one stream per request.

The group goes to the replica the deployment handle's router picks. `admit()` returns once that replica's engine
admitted every request (or raises the replica's `EngineError`, so a 429 or 400 is decided before any stream
exists). A replica that dies before the group streamed anything is replaced by another attempt; after the first
output its failure ends every unfinished stream with `EngineUnavailableError`. The streams stop the remote call
once every one of them is closed or released (`release`, the client's `abort`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from fitserve.server.engine.types import EngineError, EngineUnavailableError, RequestOutput
from fitserve.server.scaleout.errors import ReplicaEngineError
from fitserve.server.scaleout.request import Admitted, ChoiceOutput, ReplicaRequest

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # calls per group: a group that streamed nothing yet is retried when its replica died

_Item = RequestOutput | EngineError | None  # None: the replica's stream ended


class GroupCall:
    """A `ReplicaRequest` sent through a streaming deployment handle, split back into one stream per request."""

    def __init__(self, handle: Any, request: ReplicaRequest) -> None:
        self._handle = handle  # `handle.options(stream=True)` of the EngineReplica deployment
        self._request = request
        self._attempts = 0
        self._streamed = False
        self._response: Any = None
        self._queues: list[asyncio.Queue[_Item]] = [asyncio.Queue() for _ in request.requests]
        self._open = set(range(len(request.requests)))
        self._pump: asyncio.Task[None] | None = None

    @property
    def request_ids(self) -> list[str]:
        """The ids of the group's requests, in order."""
        return [request.request_id for request in self._request.requests]

    async def admit(self) -> None:
        """Send the group until a replica admits it; raise its `EngineError`, or `EngineUnavailableError`."""
        while True:
            self._attempts += 1
            response = self._handle.generate.remote(self._request)
            try:
                first = await response.__anext__()
            except Exception as error:  # noqa: BLE001 - mapped below
                response.cancel()
                self._raise_unless_retryable(error)
                continue
            if not isinstance(first, Admitted):
                response.cancel()
                raise EngineUnavailableError(f"The replica answered {type(first).__name__} instead of admitting.")
            self._response = response
            return

    def streams(self) -> list[AsyncGenerator[RequestOutput]]:
        """One output stream per request, in order (after `admit()`); starts reading the replica's stream."""
        self._pump = asyncio.create_task(self._read())
        return [self._stream(index) for index in range(len(self._queues))]

    def release(self, index: int) -> None:
        """The consumer of stream `index` is gone; the remote call stops once no stream is left."""
        self._open.discard(index)
        if not self._open:
            self.cancel()

    def cancel(self) -> None:
        """Stop the remote call (the replica then aborts whatever of the group is unfinished)."""
        if self._pump is not None:
            self._pump.cancel()
        if self._response is not None:
            self._response.cancel()

    async def _stream(self, index: int) -> AsyncGenerator[RequestOutput]:
        try:
            while True:
                item = await self._queues[index].get()
                if item is None:
                    return
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self.release(index)

    async def _read(self) -> None:
        """Deliver the replica's outputs to the streams; on a dead replica retry if nothing was streamed yet."""
        while True:
            try:
                async for item in self._response:
                    if isinstance(item, ChoiceOutput):
                        self._streamed = True
                        self._queues[item.index].put_nowait(item.output)
                break
            except Exception as error:  # noqa: BLE001 - mapped below
                self._response.cancel()
                try:
                    self._raise_unless_retryable(error)
                    await self.admit()
                except EngineError as final:
                    self._deliver(final)
                    return
        self._deliver(None)

    def _deliver(self, last: _Item) -> None:
        for queue in self._queues:
            queue.put_nowait(last)

    def _raise_unless_retryable(self, error: BaseException) -> None:
        """Raise what `error` means for the client, unless the group may go to another replica."""
        engine_error = _engine_error(error)
        if engine_error is not None:
            raise engine_error from error
        if self._streamed or self._attempts >= MAX_ATTEMPTS or not _replica_gone(error):
            logger.warning("requests %s failed on their replica: %s", self.request_ids, error)
            raise EngineUnavailableError(f"The replica serving this request failed: {type(error).__name__}") from error
        logger.info("requests %s: replica gone before the first token, retrying (%s)", self.request_ids, error)


def _engine_error(error: BaseException) -> EngineError | None:
    """The replica's own EngineError inside a Ray task error (queue full, prompt too long, ...), if any."""
    for candidate in (error, getattr(error, "cause", None)):
        if isinstance(candidate, ReplicaEngineError):
            return candidate.unwrap()
    return None


def _replica_gone(error: BaseException) -> bool:
    """True for the errors Ray raises when the replica's actor died or became unreachable."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(error, ActorDiedError | ActorUnavailableError | RayActorError)
