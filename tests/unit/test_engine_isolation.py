"""A bad request fails alone: poisoned sampling values and failing steps never change another request's tokens.

The real engine on the tiny random Llama. A good greedy streaming request runs once alone, then again while
poisoned requests arrive; it must produce exactly the same tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from fitserve.server.engine.engine import Engine
from fitserve.server.engine.scheduler import ScheduledBatch
from fitserve.server.engine.types import (
    EngineError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
)
from tests.engine_helpers import collect, greedy, load_tiny, make_engine

GOOD_PROMPT = [101, 2054, 2003, 1996, 3007, 1997, 2605, 1029]
GOOD_TOKENS = 40
FAULTY_IDS = tuple(f"fault-{i}" for i in range(5))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return load_tiny(tiny_model_dir)


def tokens_of(outputs: list[RequestOutput]) -> list[int]:
    return [t for o in outputs for t in o.token_ids_delta]


def poisoned_requests() -> list[tuple[str, SamplingParams, str]]:
    """20 requests that each used to fail the whole step: (request id, params, what they should end as)."""
    sampled = dict(max_tokens=6, ignore_eos=True)
    requests = []
    for i in range(5):  # a temperature so small that dividing by it overflows: greedy instead
        requests.append((f"tiny-temp-{i}", SamplingParams(temperature=1e-300, **sampled), "served"))  # type: ignore[arg-type]
    for i in range(5):  # penalties that make the logits NaN once there is an output token
        params = SamplingParams(temperature=1.0, presence_penalty=1e308, frequency_penalty=-1e308, **sampled)  # type: ignore[arg-type]
        requests.append((f"nan-{i}", params, "error-after-first-token"))
    for i, seed in enumerate((2**70, -(2**80), 2**64, -(2**63) - 1, 10**30)):  # seeds manual_seed would refuse
        requests.append((f"seed-{i}", SamplingParams(temperature=0.8, seed=seed, **sampled), "served"))  # type: ignore[arg-type]
    for request_id in FAULTY_IDS:  # sampling raises for these (EngineConfig.sampling_fault_request_ids)
        requests.append((request_id, SamplingParams(temperature=0.7, **sampled), "raises"))  # type: ignore[arg-type]
    return requests


async def good_stream(engine: Engine, meanwhile: Callable[[], Awaitable[Any]] | None = None) -> tuple[list[int], Any]:
    """The good request's tokens; `meanwhile` starts once its third token arrived, so both surely overlap."""
    outputs: list[RequestOutput] = []
    side: asyncio.Future[Any] | None = None
    async for output in engine.generate(GOOD_PROMPT, greedy(GOOD_TOKENS), "good"):
        outputs.append(output)
        if len(outputs) == 3 and meanwhile is not None:
            side = asyncio.ensure_future(meanwhile())
    return tokens_of(outputs), (await side if side is not None else None)


async def outcome(engine: Engine, request_id: str, params: SamplingParams) -> str:
    try:
        outputs = await collect(engine.generate([7, 8, 9, 10], params, request_id))
    except RequestFailedError:
        return "raises"
    last = outputs[-1]
    if last.finish_reason is FinishReason.ERROR:
        return "error-after-first-token" if last.completion_tokens == 1 else f"error after {last.completion_tokens}"
    assert last.finish_reason is FinishReason.LENGTH and last.completion_tokens == params.max_tokens
    return "served"


def test_good_stream_is_untouched_by_twenty_poisoned_requests(tiny) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[list[int], list[int], list[str]]:
        engine = make_engine(tiny, sampling_fault_request_ids=FAULTY_IDS)
        await engine.start()
        alone, _ = await good_stream(engine)
        poison = poisoned_requests()

        async def send_poison() -> list[str]:
            return list(await asyncio.gather(*(outcome(engine, rid, params) for rid, params, _ in poison)))

        together, outcomes = await good_stream(engine, send_poison)
        await engine.check_health()
        assert engine.snapshot().kv_reserved_tokens == 0
        await engine.stop(timeout_s=5)
        return alone, together, outcomes

    alone, together, outcomes = asyncio.run(main())
    assert len(alone) == GOOD_TOKENS
    assert together == alone
    assert outcomes == [expected for _, _, expected in poisoned_requests()]


def fail_when(engine: Engine, bad_id: str) -> Callable[[ScheduledBatch], Any]:
    """Wrap the runner so that any step holding `bad_id` raises (a failure the engine cannot attribute)."""
    real_run = engine.runner.run

    def run(batch: ScheduledBatch) -> Any:
        if any(chunk.seq.request_id == bad_id for chunk in batch.chunks):
            raise ValueError("this step cannot run")
        return real_run(batch)

    return run


def test_a_step_failure_is_retried_alone_and_fails_only_its_cause(tiny) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[list[int], list[int], BaseException | None]:
        engine = make_engine(tiny)
        await engine.start()
        alone, _ = await good_stream(engine)
        engine.runner.run = fail_when(engine, "bad")  # type: ignore[method-assign]

        async def send_bad() -> BaseException | None:
            try:
                await collect(engine.generate([5, 6, 7], greedy(5), "bad"))
            except EngineError as exc:
                return exc
            return None

        together, error = await good_stream(engine, send_bad)
        await engine.stop(timeout_s=5)
        return alone, together, error

    alone, together, error = asyncio.run(main())
    assert together == alone
    assert isinstance(error, RequestFailedError)


def test_a_group_is_admitted_whole_or_not_at_all(tiny) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = make_engine(tiny, max_batch_size=1, max_waiting=3)
        await engine.start()
        running = asyncio.ensure_future(collect(engine.generate([5] * 10, greedy(300), "running")))
        await asyncio.sleep(0.05)
        group = [GenerationRequest([6, 7], greedy(3), f"g{i}") for i in range(4)]  # 4 must wait, 3 may
        with pytest.raises(QueueFullError):
            await engine.generate_group(group)
        assert engine.snapshot().waiting == 0  # none of the four was queued
        streams = await engine.generate_group(group[:3])  # three fit
        results = await asyncio.gather(*(collect(s) for s in streams))
        assert all(r[-1].finish_reason is FinishReason.LENGTH for r in results)
        assert (await running)[-1].finished
        await engine.stop(timeout_s=5)

    asyncio.run(main())


def test_a_failure_building_one_output_fails_only_that_request(tiny) -> None:  # type: ignore[no-untyped-def]
    """Detokenising or stop matching that raises for one sequence fails it alone; the step's others go on."""

    async def main() -> tuple[list[int], list[int], BaseException | list[RequestOutput]]:
        engine = make_engine(tiny)
        await engine.start()
        alone, _ = await good_stream(engine)
        output = engine._core.output
        real_emit = output.emit

        def emit(seq, token, sampled):  # type: ignore[no-untyped-def]
            if seq.request_id == "bad-output" and seq.num_output_tokens >= 2:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer that breaks mid-stream")
            return real_emit(seq, token, sampled)

        output.emit = emit  # type: ignore[method-assign]

        async def send_bad() -> BaseException | list[RequestOutput]:
            try:
                return await collect(engine.generate([5, 6, 7], greedy(8), "bad-output"))
            except EngineError as exc:
                return exc

        together, bad = await good_stream(engine, send_bad)
        await engine.check_health()
        await engine.stop(timeout_s=5)
        return alone, together, bad

    alone, together, bad = asyncio.run(main())
    assert together == alone
    if isinstance(bad, BaseException):
        assert isinstance(bad, RequestFailedError)
    else:  # it had streamed a token before the failure: it ends with an error, not silently
        assert bad[-1].finish_reason is FinishReason.ERROR and bad[-1].completion_tokens < 8
