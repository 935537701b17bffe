"""Run load levels (closed-loop concurrency or open-loop Poisson rate) and search for the largest passing batch.

Every level is bounded: at most `num_requests` requests, no new request after `time_limit_s`, and each
request at most the client's request timeout. Completed levels are appended to a `SweepState` as they
finish, so an interrupted run (Ctrl-C) still has everything measured so far.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fitserve.loadtest.client import OpenAIClient, RequestResult
from fitserve.loadtest.scrape import LevelMetrics, MetricsWatch
from fitserve.loadtest.stats import Percentiles, summarize
from fitserve.loadtest.verdict import Finding, LevelEvidence, Objectives, judge
from fitserve.loadtest.workload import Workload

logger = logging.getLogger(__name__)

OnRequestDone = Callable[[RequestResult], None]


class Mode(enum.StrEnum):
    """What the run does."""

    CONCURRENCY = "concurrency"  # closed loop at each given concurrency
    RATE = "rate"  # open loop, Poisson arrivals at each given rate
    FIND_MAX_BATCH = "find_max_batch"  # ramp + bisect the concurrency until a level fails


@dataclass(frozen=True)
class LevelSpec:
    """One load level: exactly one of `concurrency` (closed loop) or `rate_rps` (open loop)."""

    num_requests: int
    time_limit_s: float
    concurrency: int | None = None
    rate_rps: float | None = None

    @property
    def label(self) -> str:
        """`c=4` or `r=2.5/s`."""
        return f"c={self.concurrency}" if self.concurrency is not None else f"r={self.rate_rps:g}/s"


@dataclass
class LevelResult:
    """Everything measured at one level, plus its verdict."""

    spec: LevelSpec
    duration_s: float
    ok: int
    failures: dict[str, int]
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft: Percentiles
    itl: Percentiles
    e2e: Percentiles
    metrics: LevelMetrics | None
    max_prompt_tokens: int | None
    request_tokens: int | None
    findings: list[Finding] = field(default_factory=list)
    interrupted: bool = False
    sample_errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no failure reason was found and the level ran to completion."""
        return not self.findings and not self.interrupted and self.ok > 0

    @property
    def failed_requests(self) -> int:
        """Number of failed requests."""
        return sum(self.failures.values())

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for results.json."""
        return {
            "label": self.spec.label,
            "concurrency": self.spec.concurrency,
            "rate_rps": self.spec.rate_rps,
            "num_requests_planned": self.spec.num_requests,
            "time_limit_s": self.spec.time_limit_s,
            "duration_s": self.duration_s,
            "requests_ok": self.ok,
            "requests_failed": self.failed_requests,
            "failures_by_status": dict(self.failures),
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_s": self.ttft.as_dict(),
            "itl_s": self.itl.as_dict(),
            "e2e_s": self.e2e.as_dict(),
            "max_prompt_tokens": self.max_prompt_tokens,
            "request_tokens": self.request_tokens,
            "server_metrics": self.metrics.as_dict() if self.metrics else None,
            "passed": self.passed,
            "findings": [f.as_dict() for f in self.findings],
            "interrupted": self.interrupted,
            "sample_errors": self.sample_errors,
        }


@dataclass
class MaxBatchVerdict:
    """The outcome of `--find-max-batch`."""

    largest_passing: int  # 0 when even concurrency 1 failed
    first_failing: int | None  # None when every level up to the bound passed
    reasons: list[Finding]
    max_concurrency: int
    predicted_kv_capacity: int | None = None  # KV capacity / tokens per request
    server_max_batch_size: int | None = None
    request_tokens: int | None = None
    kv_capacity_tokens: int | None = None

    @property
    def predicted_capacity(self) -> int | None:
        """What the server's own numbers predict: the smaller of KV capacity in requests and its batch cap."""
        known = [v for v in (self.predicted_kv_capacity, self.server_max_batch_size) if v is not None]
        return min(known) if known else None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for results.json."""
        return {
            "largest_passing_concurrency": self.largest_passing,
            "first_failing_concurrency": self.first_failing,
            "reasons": [f.as_dict() for f in self.reasons],
            "max_concurrency_searched": self.max_concurrency,
            "predicted_capacity": self.predicted_capacity,
            "predicted_kv_capacity_requests": self.predicted_kv_capacity,
            "server_max_batch_size": self.server_max_batch_size,
            "request_tokens": self.request_tokens,
            "kv_capacity_tokens": self.kv_capacity_tokens,
        }


@dataclass
class SweepState:
    """Levels finished so far (in run order) and, for --find-max-batch, the verdict."""

    mode: Mode
    levels: list[LevelResult] = field(default_factory=list)
    verdict: MaxBatchVerdict | None = None
    interrupted: bool = False


class LevelRunner:
    """Runs levels against one client with one workload; request indices continue across levels."""

    def __init__(
        self,
        client: OpenAIClient,
        workload: Workload,
        objectives: Objectives,
        watch: MetricsWatch | None = None,
        seed: int = 0,
        on_level_start: Callable[[LevelSpec], None] | None = None,
        on_request_done: OnRequestDone | None = None,
    ) -> None:
        self.client = client
        self.workload = workload
        self.objectives = objectives
        self.watch = watch or MetricsWatch(None)
        self.seed = seed
        self.on_level_start = on_level_start
        self.on_request_done = on_request_done
        self._next_index = 0

    def reset_indices(self) -> None:
        """Start the next level from request 0 again, so that every level sends the same prompts."""
        self._next_index = 0

    async def run(self, spec: LevelSpec, state: SweepState | None = None) -> LevelResult:
        """Run one level, judge it, and append it to `state`. On cancellation, the partial level is kept."""
        if self.on_level_start:
            self.on_level_start(spec)
        results: list[RequestResult] = []
        first = self._next_index
        self._next_index += spec.num_requests
        await self.watch.start()
        t0 = time.perf_counter()
        interrupted = False
        try:
            if spec.concurrency is not None:
                await self._closed_loop(spec, first, t0, results)
            else:
                await self._open_loop(spec, first, t0, results)
        except asyncio.CancelledError:
            interrupted = True
        end = max((r.start_s + (r.e2e_s or 0.0) for r in results), default=time.perf_counter())
        if interrupted:
            self.watch.cancel()
            metrics = None
        else:
            metrics = await self.watch.stop()
        level = self._summarize(spec, results, max(end - t0, 1e-9), metrics, interrupted)
        if state is not None:
            state.levels.append(level)
        logger.info("%s", level_line(level))
        if interrupted:
            raise asyncio.CancelledError
        return level

    async def _closed_loop(self, spec: LevelSpec, first: int, t0: float, results: list[RequestResult]) -> None:
        indices = iter(range(first, first + spec.num_requests))
        deadline = t0 + spec.time_limit_s

        async def worker() -> None:
            for i in indices:  # shared iterator: each index goes to exactly one worker
                if time.perf_counter() >= deadline:
                    return
                await self._send(i, results)

        await asyncio.gather(*(worker() for _ in range(spec.concurrency or 1)))

    async def _open_loop(self, spec: LevelSpec, first: int, t0: float, results: list[RequestResult]) -> None:
        rng = random.Random(self.seed * 7919 + first)
        rate = spec.rate_rps or 1.0
        tasks: list[asyncio.Task[None]] = []
        at = t0
        try:
            for i in range(first, first + spec.num_requests):
                at += rng.expovariate(rate)
                if at - t0 >= spec.time_limit_s:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                tasks.append(asyncio.create_task(self._send(i, results)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _send(self, index: int, results: list[RequestResult]) -> None:
        r = await self.client.send(self.workload.item(index))
        results.append(r)
        if self.on_request_done:
            self.on_request_done(r)

    def _summarize(
        self,
        spec: LevelSpec,
        results: list[RequestResult],
        duration_s: float,
        metrics: LevelMetrics | None,
        interrupted: bool,
    ) -> LevelResult:
        ok = [r for r in results if r.ok]
        failures = Counter(key for r in results if (key := r.failure_key) is not None)
        out_tokens = sum(r.output_tokens for r in ok)
        prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
        max_prompt = max(prompt_tokens) if prompt_tokens else None
        request_tokens = self.workload.max_request_tokens(max_prompt) if max_prompt is not None else None
        level = LevelResult(
            spec=spec,
            duration_s=duration_s,
            ok=len(ok),
            failures=dict(failures),
            output_tokens=out_tokens,
            output_tokens_per_s=out_tokens / duration_s,
            requests_per_s=len(ok) / duration_s,
            ttft=summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
            itl=summarize([x for r in ok for x in r.itl_s]),
            e2e=summarize([r.e2e_s for r in ok if r.e2e_s is not None]),
            metrics=metrics,
            max_prompt_tokens=max_prompt,
            request_tokens=request_tokens,
            interrupted=interrupted,
            sample_errors=sorted({f"{r.failure_key}: {r.error_message}" for r in results if not r.ok})[:5],
        )
        evidence = LevelEvidence(
            concurrency=spec.concurrency,
            failures=level.failures,
            ttft=level.ttft,
            itl=level.itl,
            e2e=level.e2e,
            metrics=metrics,
            request_tokens=request_tokens,
        )
        level.findings = judge(evidence, self.objectives)
        return level


def level_line(level: LevelResult) -> str:
    """One log line per finished level, so a run that is killed part-way still shows what it measured."""
    ttft = f"{level.ttft.p50 * 1e3:.0f} ms" if level.ttft.p50 is not None else "-"
    verdict = "pass" if level.passed else ", ".join(f.reason.value for f in level.findings) or "interrupted"
    return (
        f"{level.spec.label}: {level.ok} ok, {level.failed_requests} failed, "
        f"{level.output_tokens_per_s:.1f} out tok/s, TTFT p50 {ttft}, {verdict}"
    )


async def run_levels(runner: LevelRunner, specs: list[LevelSpec], state: SweepState) -> SweepState:
    """Run each level in order (a fixed list of concurrencies or rates)."""
    for spec in specs:
        await runner.run(spec, state)
    return state


async def find_max_batch(
    evaluate: Callable[[int], Awaitable[LevelResult]], max_concurrency: int, state: SweepState | None = None
) -> MaxBatchVerdict:
    """Largest concurrency whose level passes: ramp 1, 2, 4, ... until one fails, then bisect.

    `evaluate(c)` runs (and records) one level at concurrency `c`. The search assumes that passing is
    monotone in the concurrency and evaluates each concurrency at most once.
    """
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    seen: dict[int, LevelResult] = {}

    async def passes(c: int) -> bool:
        if c not in seen:
            seen[c] = await evaluate(c)
        return seen[c].passed

    good, bad = 0, None
    c = 1
    while c <= max_concurrency:
        if not await passes(c):
            bad = c
            break
        good = c
        if c == max_concurrency:
            break
        c = min(c * 2, max_concurrency)
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if await passes(mid):
                good = mid
            else:
                bad = mid
    verdict = MaxBatchVerdict(
        largest_passing=good,
        first_failing=bad,
        reasons=list(seen[bad].findings) if bad is not None else [],
        max_concurrency=max_concurrency,
    )
    _add_prediction(verdict, list(seen.values()))
    if state is not None:
        state.verdict = verdict
    return verdict


def _add_prediction(verdict: MaxBatchVerdict, levels: list[LevelResult]) -> None:
    """The server's own capacity numbers from /metrics: KV capacity in requests and its batch cap."""
    m = next((lv.metrics for lv in reversed(levels) if lv.metrics is not None), None)
    if m is None:
        return
    if m.max_batch_size is not None:
        verdict.server_max_batch_size = int(m.max_batch_size)
    tokens = [lv.request_tokens for lv in levels if lv.request_tokens]
    verdict.request_tokens = max(tokens) if tokens else None
    if m.kv_capacity_tokens is not None:
        verdict.kv_capacity_tokens = int(m.kv_capacity_tokens)
        if verdict.request_tokens:
            verdict.predicted_kv_capacity = int(m.kv_capacity_tokens // verdict.request_tokens)
