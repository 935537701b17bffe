"""Whether a load level passed: errors, server-side distress (from /metrics) and latency objectives.

A level fails for any of these reasons (each reported with the evidence):
- any 429, 5xx, other 4xx, connection error or client-side timeout;
- any OOM event or preemption counted by the server during the level;
- the KV cache full while requests waited (usage ratio ~1, or too little free KV for one more request);
- queueing: requests waited while the server ran fewer than the offered concurrency (its batch cap is below
  the concurrency, so extra requests only queue). Opt out with `allow_queueing`;
- a p95 objective broken (TTFT, inter-token latency, end-to-end latency).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from fitserve.loadtest.scrape import KV_FULL_RATIO, LevelMetrics
from fitserve.loadtest.stats import Percentiles


class FailureReason(enum.StrEnum):
    """Why a level did not pass."""

    HTTP_429 = "http_429"
    HTTP_5XX = "http_5xx"
    HTTP_4XX = "http_4xx"
    CONNECTION = "connection_error"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol_error"
    OOM = "oom_event"
    PREEMPTION = "preemption"
    KV_SATURATED = "kv_saturated"
    QUEUEING = "queueing"
    SLO_TTFT = "slo_ttft_p95"
    SLO_ITL = "slo_itl_p95"
    SLO_E2E = "slo_e2e_p95"


@dataclass(frozen=True)
class Objectives:
    """Latency objectives (p95, seconds; None: not checked) and what server behaviour is tolerated."""

    ttft_p95_s: float | None = None
    itl_p95_s: float | None = None
    e2e_p95_s: float | None = None
    allow_queueing: bool = False


@dataclass(frozen=True)
class Finding:
    """One reason a level failed, with the evidence in words."""

    reason: FailureReason
    detail: str

    def as_dict(self) -> dict[str, str]:
        """A plain dict for JSON output."""
        return {"reason": self.reason.value, "detail": self.detail}


@dataclass(frozen=True)
class LevelEvidence:
    """What `judge` needs from a finished level."""

    concurrency: int | None
    failures: dict[str, int]  # by HTTP status ("429") or error kind ("connection")
    ttft: Percentiles
    itl: Percentiles
    e2e: Percentiles
    metrics: LevelMetrics | None
    request_tokens: int | None  # prompt + max_tokens of the largest request, when known


def judge(ev: LevelEvidence, objectives: Objectives) -> list[Finding]:
    """Every reason the level failed; empty when it passed."""
    findings = _error_findings(ev.failures)
    if ev.metrics is not None:
        findings += _server_findings(ev.metrics, ev.concurrency, ev.request_tokens, objectives.allow_queueing)
    findings += _slo_findings(ev, objectives)
    return findings


def _error_findings(failures: dict[str, int]) -> list[Finding]:
    buckets: dict[FailureReason, dict[str, int]] = {}
    for key, count in failures.items():
        if key.isdigit():
            status = int(key)
            reason = (
                FailureReason.HTTP_429
                if status == 429
                else FailureReason.HTTP_5XX
                if status >= 500
                else FailureReason.HTTP_4XX
            )
        else:
            reason = {
                "connection": FailureReason.CONNECTION,
                "timeout": FailureReason.TIMEOUT,
            }.get(key, FailureReason.PROTOCOL)
        buckets.setdefault(reason, {})[key] = count
    return [
        Finding(reason, ", ".join(f"{n} x {k}" for k, n in sorted(keys.items())) + " failed requests")
        for reason, keys in buckets.items()
    ]


def _server_findings(
    m: LevelMetrics, concurrency: int | None, request_tokens: int | None, allow_queueing: bool
) -> list[Finding]:
    out: list[Finding] = []
    if m.oom_events_delta:
        out.append(Finding(FailureReason.OOM, f"fitserve_oom_events_total rose by {m.oom_events_delta:g}"))
    if m.preemptions_delta:
        out.append(Finding(FailureReason.PREEMPTION, f"fitserve_preemptions_total rose by {m.preemptions_delta:g}"))
    full_ratio = (
        m.peak_kv_usage_ratio_while_waiting is not None and m.peak_kv_usage_ratio_while_waiting >= KV_FULL_RATIO
    )
    no_room = (
        request_tokens is not None
        and m.min_kv_free_tokens_while_waiting is not None
        and m.min_kv_free_tokens_while_waiting < request_tokens
    )
    if full_ratio or no_room:
        out.append(
            Finding(
                FailureReason.KV_SATURATED,
                "requests waited while the KV cache was full "
                f"(usage ratio {m.peak_kv_usage_ratio_while_waiting or 0:.2f}, "
                f"least free {_fmt(m.min_kv_free_tokens_while_waiting)} tokens, "
                f"a request needs up to {_fmt(request_tokens)})",
            )
        )
    elif (
        not allow_queueing
        and concurrency is not None
        and (m.peak_waiting or 0) > 0
        and m.peak_running is not None
        and m.peak_running < concurrency
    ):
        out.append(
            Finding(
                FailureReason.QUEUEING,
                f"requests waited (peak {m.peak_waiting:g}) while at most {m.peak_running:g} of {concurrency} ran "
                f"(server max batch {_fmt(m.max_batch_size)})",
            )
        )
    return out


def _slo_findings(ev: LevelEvidence, o: Objectives) -> list[Finding]:
    out: list[Finding] = []
    for reason, name, limit, dist in (
        (FailureReason.SLO_TTFT, "TTFT", o.ttft_p95_s, ev.ttft),
        (FailureReason.SLO_ITL, "ITL", o.itl_p95_s, ev.itl),
        (FailureReason.SLO_E2E, "e2e latency", o.e2e_p95_s, ev.e2e),
    ):
        if limit is not None and dist.p95 is not None and dist.p95 > limit:
            out.append(Finding(reason, f"{name} p95 {dist.p95 * 1000:.0f} ms > objective {limit * 1000:.0f} ms"))
    return out


def _fmt(value: float | int | None) -> str:
    return "?" if value is None else f"{value:g}"
