"""`KvAutoscalingPolicy`: Ray Serve's custom autoscaling hook around `autoscale.KvAutoscaler`.

Serve instantiates the class once in its controller (with `policy_kwargs`) and calls it every control-loop tick
with an `AutoscalingContext` whose `aggregated_metrics` hold each replica's `record_autoscaling_stats`. Decisions
are reported to the application's directory so that the ingress exports them as metrics.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

from fitserve.server.scaleout.autoscale import KV_USAGE_METRIC, WAITING_METRIC, AutoscaleConfig, KvAutoscaler
from fitserve.server.scaleout.config import DIRECTORY_NAMESPACE

logger = logging.getLogger(__name__)

HELD_AT_ROUTER = "router"  # the waiting entry for requests queued at the handle (held by the router)


class KvAutoscalingPolicy:
    """Callable Serve autoscaling policy: (context) -> (target replicas, policy state)."""

    def __init__(self, directory_name: str | None = None, **config: Any) -> None:
        self._autoscaler = KvAutoscaler(AutoscaleConfig(**config))
        self._directory_name = directory_name
        self._directory: Any = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """The target replica count for this tick."""
        metrics = ctx.aggregated_metrics or {}
        kv_usage = {str(replica): float(value) for replica, value in (metrics.get(KV_USAGE_METRIC) or {}).items()}
        waiting = {str(replica): float(value) for replica, value in (metrics.get(WAITING_METRIC) or {}).items()}
        held = held_at_router(ctx)
        if held:  # requests the memory-aware router holds while no replica has KV room wait too
            waiting[HELD_AT_ROUTER] = held
        now = ctx.current_time if ctx.current_time is not None else time.time()
        decision = self._autoscaler.decide(now, ctx.target_num_replicas, kv_usage, waiting)
        if decision.event is not None:
            logger.info("autoscaler: %s to %d replicas (%s)", decision.event, decision.target_replicas, decision.reason)
        self._report(decision.event, decision.target_replicas)
        return decision.target_replicas, dict(ctx.policy_state or {})

    def _report(self, event: Any, target: int) -> None:
        if self._directory_name is None:
            return
        with contextlib.suppress(Exception):  # metrics must never break scaling
            if self._directory is None:
                from fitserve.server.scaleout.directory import get_directory

                self._directory = get_directory(self._directory_name, DIRECTORY_NAMESPACE)
            if event is not None:
                self._directory.record_decision.remote(str(event), target)
            else:
                self._directory.record_target.remote(target)


def held_at_router(ctx: Any) -> float:
    """Whole requests queued at the deployment's handles over the look-back window (Serve's
    `total_queued_requests`: the memory-aware router's held requests, plus momentary routing that rounds to 0)."""
    return float(math.floor(ctx.total_queued_requests or 0.0))
