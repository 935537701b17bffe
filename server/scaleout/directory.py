"""The application's directory: a small Ray actor that knows every replica's metrics address and the
autoscaler's decisions, so that the ingress can hand Prometheus its targets (`/metrics/targets`, http_sd)
and export the decisions. Replicas re-register every few seconds; one that stops doing so (killed) drops out.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

TARGET_TTL_S = 15.0


class Directory:
    """Plain class; `get_directory` runs it as a named, detached Ray actor."""

    def __init__(self) -> None:
        self._targets: dict[str, tuple[str, dict[str, str], float]] = {}
        self._decisions: Counter[str] = Counter()
        self._target_replicas: int | None = None

    def register(self, replica: str, address: str, labels: dict[str, str]) -> None:
        """Record (or refresh) a replica's metrics address `host:port`."""
        self._targets[replica] = (address, labels, time.monotonic())

    def unregister(self, replica: str) -> None:
        """Drop a replica that is shutting down."""
        self._targets.pop(replica, None)

    def targets(self) -> list[dict[str, Any]]:
        """Prometheus http_sd targets: one entry per live replica, labelled with `replica`."""
        now = time.monotonic()
        live = {name: entry for name, entry in self._targets.items() if now - entry[2] <= TARGET_TTL_S}
        self._targets = live
        return [
            {"targets": [address], "labels": {"replica": name, **labels}}
            for name, (address, labels, _) in sorted(live.items())
        ]

    def record_decision(self, direction: str, target_replicas: int) -> None:
        """Count an autoscaler event (`up` / `down`) and remember the target."""
        self._decisions[direction] += 1
        self._target_replicas = target_replicas

    def record_target(self, target_replicas: int) -> None:
        """The autoscaler's current target (every tick)."""
        self._target_replicas = target_replicas

    def decisions(self) -> dict[str, Any]:
        """Event counts by direction and the current target."""
        return {"events": dict(self._decisions), "target_replicas": self._target_replicas}


def get_directory(name: str, namespace: str) -> Any:
    """The directory actor, created on first use (detached: it outlives the replica that created it)."""
    import ray

    actor = ray.remote(num_cpus=0)(Directory)
    return actor.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached").remote()
