"""A request group's trip to an engine replica and back (server/scaleout/{group_call,streams,request}.py).

A fake deployment handle stands in for Ray Serve: its `generate.remote(request)` runs the replica's side (the
group admitted by a fake engine, its streams merged) in the same event loop. No Ray involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from fitserve.server.engine.types import (
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestOutput,
    SamplingParams,
)
from fitserve.server.scaleout.errors import ReplicaEngineError
from fitserve.server.scaleout.group_call import GroupCall
from fitserve.server.scaleout.request import Admitted, ReplicaRequest
from fitserve.server.scaleout.streams import merge_streams


def output(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    reason = FinishReason.LENGTH if finished else None
    return RequestOutput(request_id, f"t{token}", (token,), finished, reason, 3, token + 1)


async def tokens(request_id: str, count: int, delay_s: float = 0.0, closed: list[str] | None = None):
    """A fake engine stream of `count` outputs; records in `closed` when it is closed or cancelled before the end."""
    done = False
    try:
        for token in range(count):
            await asyncio.sleep(delay_s)
            yield output(request_id, token, finished=token == count - 1)
        done = True
    finally:
        if not done and closed is not None:
            closed.append(request_id)


class FakeResponse:
    """A DeploymentResponseGenerator stand-in around the replica's async generator."""

    def __init__(self, generator: AsyncIterator) -> None:
        self._generator = generator
        self.cancelled = False

    def __aiter__(self) -> FakeResponse:
        return self

    async def __anext__(self):
        return await self._generator.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.generate.remote(request)` -> a FakeResponse of what `replica(request)` yields."""

    def __init__(self, replica: Callable[[ReplicaRequest], AsyncIterator]) -> None:
        self.generate = self
        self._replica = replica
        self.responses: list[FakeResponse] = []

    def remote(self, request: ReplicaRequest) -> FakeResponse:
        response = FakeResponse(self._replica(request))
        self.responses.append(response)
        return response


def group(*prompt_lengths: int, max_tokens: int = 4) -> ReplicaRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return ReplicaRequest(tuple(GenerationRequest([1] * n, params, f"r{i}") for i, n in enumerate(prompt_lengths)))


def test_a_group_counts_every_request_s_kv_tokens_and_routes_by_the_first_prompt() -> None:
    request = group(5, 7, max_tokens=10)
    assert request.kv_tokens == 5 + 10 + 7 + 10
    assert request.prompt_token_ids == (1,) * 5
    with pytest.raises(ValueError):
        ReplicaRequest(())


def test_merged_streams_keep_each_output_s_index_and_order() -> None:
    async def main() -> list[tuple[int, int]]:
        merged = merge_streams([tokens("a", 3, 0.001), tokens("b", 2, 0.002)])
        return [(item.index, item.output.token_ids_delta[0]) async for item in merged]

    items = asyncio.run(main())
    assert [token for index, token in items if index == 0] == [0, 1, 2]
    assert [token for index, token in items if index == 1] == [0, 1]


def test_closing_the_merged_stream_closes_every_engine_stream() -> None:
    closed: list[str] = []

    async def main() -> None:
        merged = merge_streams([tokens("a", 50, 0.001, closed), tokens("b", 50, 0.001, closed)])
        await merged.__anext__()
        await merged.aclose()

    asyncio.run(main())
    assert sorted(closed) == ["a", "b"]


def test_a_group_is_admitted_then_split_back_into_one_stream_per_request() -> None:
    async def replica(request: ReplicaRequest):
        yield Admitted()
        streams = [tokens(r.request_id, 3 + i, 0.001) for i, r in enumerate(request.requests)]
        async for item in merge_streams(streams):
            yield item

    async def main() -> list[list[RequestOutput]]:
        call = GroupCall(FakeHandle(replica), group(4, 4))
        await call.admit()

        async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
            return [out async for out in stream]

        return await asyncio.gather(*(collect(stream) for stream in call.streams()))

    first, second = asyncio.run(main())
    assert [o.request_id for o in first] == ["r0"] * 3 and first[-1].finished
    assert [o.request_id for o in second] == ["r1"] * 4 and second[-1].finished


def test_a_refused_group_raises_the_replica_s_engine_error_before_any_stream() -> None:
    async def replica(request: ReplicaRequest):
        raise ReplicaEngineError.wrap(QueueFullError(max_waiting=4, retry_after_s=2, requested=2))
        yield  # an async generator, like the replica's

    handle = FakeHandle(replica)

    async def main() -> None:
        await GroupCall(handle, group(4, 4)).admit()

    with pytest.raises(QueueFullError) as raised:
        asyncio.run(main())
    assert raised.value.retry_after_s == 2 and "all 2 requests" in str(raised.value)
    assert len(handle.responses) == 1 and handle.responses[0].cancelled  # not retried: the replica said no


def test_the_call_stops_once_every_stream_is_released() -> None:
    async def replica(request: ReplicaRequest):
        yield Admitted()
        async for item in merge_streams([tokens(r.request_id, 100, 0.001) for r in request.requests]):
            yield item

    handle = FakeHandle(replica)

    async def main() -> None:
        call = GroupCall(handle, group(4, 4))
        await call.admit()
        first, _never_iterated = call.streams()
        await first.__anext__()
        await first.aclose()
        assert not handle.responses[0].cancelled  # the other request still streams
        call.release(1)  # the client's abort of a stream nobody iterated
        await asyncio.sleep(0)
        assert handle.responses[0].cancelled

    asyncio.run(main())
