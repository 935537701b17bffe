"""Run the n engine requests behind one HTTP request and merge their outputs.

`ChoiceGeneration` submits the choices to the engine as one group (all admitted or none: a 429 is decided before
any task is created), starts one pump task per admitted choice, waits until every choice has either produced its
first output or failed (so errors before the first token become real HTTP statuses, even for streaming), then
yields `(choice_index, RequestOutput)` in arrival order. Closing it cancels the pumps, which stops
iterating the engine generators, and aborts every request id explicitly as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fitserve.server.engine.types import (
    EngineClient,
    EngineError,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
)
from fitserve.server.protocol.errors import APIError
from fitserve.server.request_id import current_request_id
from fitserve.server.serving.common import engine_error_to_api

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoiceRequest:
    """One engine request: the prompt and parameters of one choice."""

    index: int
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    request_id: str


@dataclass(frozen=True)
class _Done:
    """Pump marker: the engine generator ended."""


@dataclass(frozen=True)
class _Failed:
    """Pump marker: the engine generator raised."""

    error: BaseException


_Item = RequestOutput | _Done | _Failed


class ChoiceGeneration:
    """The merged output stream of several engine requests."""

    def __init__(self, engine: EngineClient, choices: Sequence[ChoiceRequest], prompt_param: str) -> None:
        self._engine = engine
        self._choices = list(choices)
        self._prompt_param = prompt_param
        self._queue: asyncio.Queue[tuple[int, _Item]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer: list[tuple[int, _Item]] = []
        self._finished: set[int] = set()
        self._closed = False
        self._abort_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Admit every choice as one group, then wait for each one's first output; raise `APIError` (after
        aborting the rest) if the group is refused or a choice fails before its first output."""
        requests = [GenerationRequest(c.prompt_token_ids, c.params, c.request_id) for c in self._choices]
        try:
            streams = await self._engine.generate_group(requests)
        except EngineError as error:
            raise self._to_api_error(error) from error
        self._tasks = [
            asyncio.create_task(self._pump(choice, stream))
            for choice, stream in zip(self._choices, streams, strict=True)
        ]
        started: set[int] = set()
        try:
            while len(started) < len(self._choices):
                index, item = await self._queue.get()
                if isinstance(item, _Failed):
                    raise self._to_api_error(item.error)
                started.add(index)
                self._buffer.append((index, item))
        except BaseException:
            self.close()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield outputs until every choice finished; raise `APIError` if one fails midway."""
        while len(self._finished) < len(self._choices):
            if self._buffer:
                index, item = self._buffer.pop(0)
            else:
                index, item = await self._queue.get()
            if isinstance(item, _Failed):
                raise self._to_api_error(item.error)
            if isinstance(item, _Done):
                if index not in self._finished:  # generator ended without a finished output
                    raise APIError(500, "the engine ended a request without finishing it", code="internal_error")
                continue
            if item.finished:
                self._finished.add(index)
                _raise_for_failed_finish(item.finish_reason)
            yield index, item

    def close(self) -> None:
        """Stop every engine request that has not finished (idempotent, never awaits)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        unfinished = [c.request_id for c in self._choices if c.index not in self._finished]
        if unfinished:
            # Cancelling a pump already closes its engine generator (which aborts the request); the
            # explicit abort also covers engines that only clean up on abort(). It runs detached because
            # close() is called from cancelled tasks, where awaiting is not possible.
            self._abort_task = asyncio.ensure_future(self._abort_all(unfinished))

    async def _pump(self, choice: ChoiceRequest, generator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in generator:
                await self._queue.put((choice.index, output))
            await self._queue.put((choice.index, _Done()))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - forwarded to the consumer, which maps it
            await self._queue.put((choice.index, _Failed(error)))
        finally:
            aclose = getattr(generator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):  # best effort while cancelling
                    await aclose()

    async def _abort_all(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            try:
                await self._engine.abort(request_id)
            except Exception:
                logger.exception("aborting request %s failed", request_id)

    def _to_api_error(self, error: BaseException) -> APIError:
        if isinstance(error, APIError):
            return error
        if isinstance(error, EngineError):
            return engine_error_to_api(error, prompt_param=self._prompt_param)
        logger.error("engine request failed (request %s)", current_request_id(), exc_info=error)
        return APIError(500, "internal error while generating", code="internal_error")


def _raise_for_failed_finish(reason: FinishReason | None) -> None:
    """A request that finished by abort or error has no valid answer."""
    if reason is FinishReason.ABORT:
        raise APIError(503, "the request was aborted (server shutting down)", code="request_aborted")
    if reason is FinishReason.ERROR:
        raise APIError(503, "the engine failed while generating this request", code="generation_failed")
