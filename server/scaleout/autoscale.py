"""Autoscaling on memory: KV usage and waiting requests decide the replica count (pure logic, no Ray).

`KvAutoscaler.decide` is called every few seconds with each replica's KV usage (reserved / capacity) and waiting
queue. It scales up by one replica after `upscale_delay_s` of sustained pressure (any replica at or above
`kv_usage_high`, or a non-empty queue anywhere) and down by one after `downscale_delay_s` of sustained
idleness (every replica at or below `kv_usage_low`, nothing queued). Between the two thresholds it holds; each
event restarts the timers, so a steady load gives no flapping.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

# Custom autoscaling metrics a replica reports (`EngineReplica.record_autoscaling_stats`).
KV_USAGE_METRIC = "fitserve_kv_usage"
WAITING_METRIC = "fitserve_waiting"


class ScaleDirection(enum.StrEnum):
    """A scaling event's direction (the `direction` label of the autoscaler metrics)."""

    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class AutoscaleConfig:
    """Bounds, thresholds and delays of the memory autoscaler."""

    min_replicas: int = 1
    max_replicas: int = 2
    kv_usage_high: float = 0.9
    kv_usage_low: float = 0.1
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 15.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if not 0 <= self.kv_usage_low < self.kv_usage_high <= 1:
            raise ValueError("need 0 <= kv_usage_low < kv_usage_high <= 1")


@dataclass(frozen=True)
class ScaleDecision:
    """The replica count to aim for, and the event that changed it (None: hold)."""

    target_replicas: int
    event: ScaleDirection | None
    reason: str


@dataclass
class KvAutoscaler:
    """Stateful: remembers since when pressure or idleness has lasted."""

    config: AutoscaleConfig
    _pressure_since: float | None = None
    _idle_since: float | None = None
    _events: list[tuple[float, ScaleDirection]] = field(default_factory=list)

    def decide(
        self, now_s: float, current_replicas: int, kv_usage: Mapping[str, float], waiting: Mapping[str, float]
    ) -> ScaleDecision:
        """The target for `current_replicas` given each running replica's KV usage and waiting queue."""
        config = self.config
        bounded = min(max(current_replicas, config.min_replicas), config.max_replicas)
        if bounded != current_replicas:
            return ScaleDecision(bounded, None, "outside the min/max bounds")
        if not kv_usage:  # replicas starting: no metrics yet
            self._pressure_since = self._idle_since = None
            return ScaleDecision(current_replicas, None, "no metrics yet")
        queued = sum(waiting.values())
        pressure = queued > 0 or max(kv_usage.values()) >= config.kv_usage_high
        idle = queued == 0 and max(kv_usage.values()) <= config.kv_usage_low
        self._pressure_since = _since(self._pressure_since, now_s) if pressure else None
        self._idle_since = _since(self._idle_since, now_s) if idle else None
        if pressure and current_replicas < config.max_replicas:
            if now_s - self._pressure_since >= config.upscale_delay_s:  # type: ignore[operator]
                return self._event(now_s, current_replicas + 1, ScaleDirection.UP, f"KV pressure (queued={queued:g})")
            return ScaleDecision(current_replicas, None, "pressure, waiting for the upscale delay")
        if idle and current_replicas > config.min_replicas:
            if now_s - self._idle_since >= config.downscale_delay_s:  # type: ignore[operator]
                return self._event(now_s, current_replicas - 1, ScaleDirection.DOWN, "idle")
            return ScaleDecision(current_replicas, None, "idle, waiting for the downscale delay")
        return ScaleDecision(current_replicas, None, "steady")

    def _event(self, now_s: float, target: int, direction: ScaleDirection, reason: str) -> ScaleDecision:
        self._pressure_since = self._idle_since = None  # the next event needs a fresh sustained condition
        self._events.append((now_s, direction))
        return ScaleDecision(target, direction, reason)

    def events_since(self, since_s: float) -> list[tuple[float, ScaleDirection]]:
        """Scaling events at or after `since_s` (for tests and the decision metrics)."""
        return [event for event in self._events if event[0] >= since_s]


def _since(start_s: float | None, now_s: float) -> float:
    """When a condition that holds now began: its recorded start, or now."""
    return now_s if start_s is None else start_s
