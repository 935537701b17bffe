"""Read fitserve's Prometheus `/metrics` before, during (a bounded background poll) and after a load level.

Only the text format is parsed (prometheus_client's parser); nothing is imported from the server. A target
that does not expose `fitserve_*` series is simply reported as having no server metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

#: KV usage ratio at or above which the cache counts as full.
KV_FULL_RATIO = 0.98

Fetch = Callable[[], Awaitable[str | None]]


@dataclass(frozen=True)
class MetricsSample:
    """The fitserve series the load test uses, at one instant. None: the server does not export it."""

    t_s: float
    memory_budget_bytes: float | None = None
    device_memory_used_bytes: float | None = None
    kv_capacity_tokens: float | None = None
    kv_used_tokens: float | None = None
    kv_reserved_tokens: float | None = None
    kv_usage_ratio: float | None = None
    requests_running: float | None = None
    requests_waiting: float | None = None
    oom_events_total: float | None = None
    preemptions_total: float | None = None
    generation_tokens_total: float | None = None
    max_batch_size: float | None = None

    @property
    def kv_free_tokens(self) -> float | None:
        """KV tokens neither used nor reserved, when the server exports capacity."""
        if self.kv_capacity_tokens is None:
            return None
        taken = max(self.kv_used_tokens or 0.0, self.kv_reserved_tokens or 0.0)
        return self.kv_capacity_tokens - taken


_SERIES = {
    "fitserve_memory_budget_bytes": "memory_budget_bytes",
    "fitserve_device_memory_used_bytes": "device_memory_used_bytes",
    "fitserve_kv_cache_capacity_tokens": "kv_capacity_tokens",
    "fitserve_kv_cache_used_tokens": "kv_used_tokens",
    "fitserve_kv_cache_reserved_tokens": "kv_reserved_tokens",
    "fitserve_kv_cache_usage_ratio": "kv_usage_ratio",
    "fitserve_requests_running": "requests_running",
    "fitserve_requests_waiting": "requests_waiting",
    "fitserve_oom_events_total": "oom_events_total",
    "fitserve_preemptions_total": "preemptions_total",
    "fitserve_generation_tokens_total": "generation_tokens_total",
    "fitserve_engine_current_max_batch_size": "max_batch_size",
}


def parse_metrics(text: str, t_s: float | None = None) -> MetricsSample | None:
    """The fitserve series in a Prometheus text exposition, or None if it has no `fitserve_` series.

    Series with several label sets (one per device) are summed. The server's current batch cap is
    `fitserve_engine_current_max_batch_size` (any `fitserve_*max_batch_size*` gauge is accepted too).
    """
    values: dict[str, float] = {}
    seen_fitserve = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if not name.startswith("fitserve_") or name.endswith("_created"):
                continue
            seen_fitserve = True
            field_name = _SERIES.get(name)
            if field_name is None and "max_batch_size" in name and not name.endswith(("_bucket", "_sum", "_count")):
                field_name = "max_batch_size"
            if field_name is not None:
                values[field_name] = values.get(field_name, 0.0) + float(sample.value)
    if not seen_fitserve:
        return None
    return MetricsSample(t_s=time.perf_counter() if t_s is None else t_s, **values)


@dataclass
class LevelMetrics:
    """What the server's metrics said during one level (peaks over all samples, counter deltas)."""

    samples: int = 0
    memory_budget_bytes: float | None = None
    peak_memory_used_bytes: float | None = None
    peak_kv_usage_ratio: float | None = None
    peak_running: float | None = None
    peak_waiting: float | None = None
    kv_capacity_tokens: float | None = None
    max_batch_size: float | None = None
    oom_events_delta: float | None = None
    preemptions_delta: float | None = None
    generation_tokens_delta: float | None = None
    # Over the samples where requests were waiting: the fullest KV usage and the least free KV.
    peak_kv_usage_ratio_while_waiting: float | None = None
    min_kv_free_tokens_while_waiting: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A plain dict for JSON/CSV output."""
        return asdict(self)


def summarize_samples(
    before: MetricsSample | None, during: list[MetricsSample], after: MetricsSample | None
) -> LevelMetrics:
    """Peaks over every sample and counter deltas between `before` and `after`."""
    all_samples = [s for s in (before, *during, after) if s is not None]
    out = LevelMetrics(samples=len(all_samples))
    if not all_samples:
        return out
    out.memory_budget_bytes = _last(all_samples, "memory_budget_bytes")
    out.kv_capacity_tokens = _last(all_samples, "kv_capacity_tokens")
    out.max_batch_size = _last(all_samples, "max_batch_size")
    out.peak_memory_used_bytes = _peak(all_samples, "device_memory_used_bytes")
    out.peak_kv_usage_ratio = _peak(all_samples, "kv_usage_ratio")
    out.peak_running = _peak(all_samples, "requests_running")
    out.peak_waiting = _peak(all_samples, "requests_waiting")
    waiting = [s for s in all_samples if (s.requests_waiting or 0) > 0]
    out.peak_kv_usage_ratio_while_waiting = _peak(waiting, "kv_usage_ratio")
    free = [s.kv_free_tokens for s in waiting if s.kv_free_tokens is not None]
    out.min_kv_free_tokens_while_waiting = min(free) if free else None
    if before is not None and after is not None:
        out.oom_events_delta = _delta(before, after, "oom_events_total")
        out.preemptions_delta = _delta(before, after, "preemptions_total")
        out.generation_tokens_delta = _delta(before, after, "generation_tokens_total")
    return out


def _last(samples: list[MetricsSample], name: str) -> float | None:
    vals = [getattr(s, name) for s in samples if getattr(s, name) is not None]
    return vals[-1] if vals else None


def _peak(samples: list[MetricsSample], name: str) -> float | None:
    vals = [getattr(s, name) for s in samples if getattr(s, name) is not None]
    return max(vals) if vals else None


def _delta(before: MetricsSample, after: MetricsSample, name: str) -> float | None:
    a, b = getattr(before, name), getattr(after, name)
    return None if a is None or b is None else b - a


class MetricsWatch:
    """Scrapes `/metrics` once before a level, every `interval_s` during it (at most `max_polls` times), once after.

    `fetch` returns the exposition text, or None when it could not be read. If the first scrape shows no
    `fitserve_` series the watch turns itself off, so non-fitserve targets cost one request per level.
    """

    def __init__(self, fetch: Fetch | None, interval_s: float = 0.25, max_polls: int = 2400) -> None:
        self._fetch = fetch
        self.interval_s = interval_s
        self.max_polls = max_polls
        self._before: MetricsSample | None = None
        self._during: list[MetricsSample] = []
        self._task: asyncio.Task[None] | None = None

    async def scrape(self) -> MetricsSample | None:
        """One scrape; None if unavailable or not a fitserve server."""
        if self._fetch is None:
            return None
        try:
            text = await self._fetch()
            return parse_metrics(text) if text else None
        except Exception as exc:  # noqa: BLE001 - a failed scrape must never fail the load test
            logger.debug("metrics scrape failed: %r", exc)
            return None

    async def start(self) -> None:
        """Take the `before` sample and start the background poll."""
        self._during = []
        self._before = await self.scrape()
        if self._before is not None:
            self._task = asyncio.create_task(self._poll())

    def cancel(self) -> None:
        """Stop polling without a final scrape (used when the level is interrupted)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._before = None

    async def stop(self) -> LevelMetrics | None:
        """Stop polling, take the `after` sample; None when the target exposes no fitserve metrics."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._before is None:
            return None
        after = await self.scrape()
        return summarize_samples(self._before, self._during, after)

    async def _poll(self) -> None:
        for _ in range(self.max_polls):
            await asyncio.sleep(self.interval_s)
            sample = await self.scrape()
            if sample is not None:
                self._during.append(sample)
