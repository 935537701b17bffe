"""The ramp-then-bisect search of --find-max-batch, with a planted pass/fail threshold (no HTTP)."""

from __future__ import annotations

import asyncio

import pytest

from fitserve.loadtest.stats import summarize
from fitserve.loadtest.sweep import LevelResult, LevelSpec, Mode, SweepState, find_max_batch
from fitserve.loadtest.verdict import FailureReason, Finding


def _level(c: int, passed: bool) -> LevelResult:
    empty = summarize([])
    return LevelResult(
        spec=LevelSpec(num_requests=2 * c, time_limit_s=1.0, concurrency=c),
        duration_s=1.0,
        ok=2 * c,
        failures={} if passed else {"429": 1},
        output_tokens=0,
        output_tokens_per_s=0.0,
        requests_per_s=0.0,
        ttft=empty,
        itl=empty,
        e2e=empty,
        metrics=None,
        max_prompt_tokens=None,
        request_tokens=None,
        findings=[] if passed else [Finding(FailureReason.HTTP_429, "1 x 429")],
    )


def _search(threshold: int, max_concurrency: int) -> tuple[list[int], object]:
    tried: list[int] = []

    async def evaluate(c: int) -> LevelResult:
        tried.append(c)
        return _level(c, passed=c <= threshold)

    state = SweepState(mode=Mode.FIND_MAX_BATCH)
    verdict = asyncio.run(find_max_batch(evaluate, max_concurrency, state))
    assert state.verdict is verdict
    return tried, verdict


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 6, 7, 8, 13, 31])
def test_finds_every_threshold_and_never_repeats_a_level(threshold: int) -> None:
    tried, verdict = _search(threshold, max_concurrency=64)
    assert verdict.largest_passing == threshold
    assert verdict.first_failing == threshold + 1
    assert verdict.reasons[0].reason is FailureReason.HTTP_429
    assert len(tried) == len(set(tried))


def test_ramp_then_bisect_order() -> None:
    tried, _ = _search(6, max_concurrency=64)
    assert tried == [1, 2, 4, 8, 6, 7]


def test_everything_passes_up_to_the_bound() -> None:
    tried, verdict = _search(100, max_concurrency=5)
    assert tried == [1, 2, 4, 5]
    assert verdict.largest_passing == 5 and verdict.first_failing is None and verdict.reasons == []


def test_concurrency_one_fails() -> None:
    tried, verdict = _search(0, max_concurrency=8)
    assert tried == [1]
    assert verdict.largest_passing == 0 and verdict.first_failing == 1


def test_bad_bound_is_refused() -> None:
    with pytest.raises(ValueError):
        _search(1, max_concurrency=0)
