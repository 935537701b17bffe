"""HTTP plumbing shared by the serving classes: SSE framing and client-disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fitserve.server.protocol.errors import APIError

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"


def sse_data(payload: str) -> str:
    """One SSE event carrying a JSON payload."""
    return f"data: {payload}\n\n"


def sse_error(error: APIError) -> str:
    """An in-stream error event (used once the 200 headers are already sent)."""
    body = error.to_response().model_dump(mode="json")
    return sse_data(json.dumps(body, separators=(",", ":")))


class SSEResponse(StreamingResponse):
    """`text/event-stream` response that always watches for the client going away.

    Starlette only listens for `http.disconnect` on ASGI spec < 2.4; this class does it on every server, so
    the body iterator is cancelled (and the engine requests behind it aborted) as soon as the client leaves.
    """

    media_type = "text/event-stream"

    def __init__(self, content: object, headers: dict[str, str] | None = None) -> None:
        merged = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        super().__init__(content, headers=merged)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as task_group:

            async def run_then_cancel(func: Awaitable[None]) -> None:
                await func
                task_group.cancel_scope.cancel()

            task_group.start_soon(run_then_cancel, self.stream_response(send))
            await run_then_cancel(self.listen_for_disconnect(receive))


class ClientDisconnectedError(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientDisconnectedError) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnectedError("client disconnected")
    return task.result()
