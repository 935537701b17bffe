"""The ingress's Prometheus series: router decisions (`fitserve_router_*`) and autoscaler decisions.

Replica series (ledger, KV cache, requests) are not here: each replica serves its own registry and Prometheus
scrapes it as a separate target with a `replica` label (see docs/scaling.md). Ray instantiates the request
router itself, inside the ingress process, so its counters live in one registry per process (`router_metrics`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class RouterMetrics:
    """Counters and gauges the memory-aware router updates on every decision."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.decisions = Counter(
            "fitserve_router_decisions_total",
            "Requests routed, by replica and by what decided (free_kv: most free KV tokens; prefix_affinity: a tie "
            "broken by the replica that last served the prompt's prefix).",
            ("replica", "reason"),
            registry=self.registry,
        )
        self.free_kv_tokens = Gauge(
            "fitserve_router_free_kv_tokens",
            "Free KV tokens the router estimated for each replica at its last decision (stats minus in-flight).",
            ("replica",),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fitserve_router_in_flight_requests",
            "Requests the router sent to each replica and has not yet seen finish.",
            ("replica",),
            registry=self.registry,
        )

        self.held = Gauge(
            "fitserve_router_held_requests",
            "Requests the router is holding because no replica has their KV tokens free (late binding).",
            registry=self.registry,
        )
        self.hold_seconds = Histogram(
            "fitserve_router_hold_seconds",
            "How long requests were held for KV room before being routed (0 for requests that found room).",
            buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )

    def forget(self, replica: str) -> None:
        """Drop a gone replica's gauges."""
        for gauge in (self.free_kv_tokens, self.in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(replica)


@functools.cache
def router_metrics() -> RouterMetrics:
    """The process's router metrics (one per ingress process; Ray creates the router, not us)."""
    return RouterMetrics()


class _AutoscalerCollector(Collector):
    """Autoscaler decisions read at scrape time from a callable (the ingress's cached directory reading)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        decisions = self._read() or {}
        events = CounterMetricFamily(
            "fitserve_autoscaler_scale_events", "Replica count changes the autoscaler decided.", labels=("direction",)
        )
        for direction in ("up", "down"):
            events.add_metric([direction], float(decisions.get("events", {}).get(direction, 0)))
        yield events
        target = decisions.get("target_replicas")
        if target is not None:
            yield GaugeMetricFamily(
                "fitserve_autoscaler_target_replicas", "Engine replicas the autoscaler aims for.", value=float(target)
            )


class IngressMetrics:
    """What the ingress's /metrics renders: router series plus autoscaler decisions."""

    def __init__(self, read_decisions: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_AutoscalerCollector(read_decisions))

    def render(self) -> tuple[bytes, str]:
        """Prometheus text of the router's and the autoscaler's series."""
        return generate_latest(router_metrics().registry) + generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
