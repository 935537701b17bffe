"""The engine replica: one fitserve engine that plans for the device Ray gave it (a Ray Serve deployment class).

Start-up reuses `fitserve serve`'s wiring (plan -> load -> engine -> metrics). The replica admits each request
group the ingress sends and streams its outputs back (`request.py`), reports its KV state for routing
(`record_routing_stats`) and autoscaling (`record_autoscaling_stats`), and serves its own Prometheus registry on
an ephemeral port that it registers with the application's directory (the `replica` label comes from there).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fitserve.server.engine.types import EngineError
from fitserve.server.scaleout.autoscale import KV_USAGE_METRIC, WAITING_METRIC
from fitserve.server.scaleout.budget import replica_memory_budget
from fitserve.server.scaleout.config import DIRECTORY_NAMESPACE, ScaleoutConfig
from fitserve.server.scaleout.errors import ReplicaEngineError
from fitserve.server.scaleout.request import Admitted, ChoiceOutput, ReplicaRequest
from fitserve.server.scaleout.streams import merge_streams

logger = logging.getLogger(__name__)


class EngineReplica:
    """A fitserve engine inside a Ray Serve replica."""

    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray awaits async __init__
        """Plan within this replica's budget, load the model and start the engine (Ray awaits this)."""
        from ray import serve

        from fitserve.server.serve import load_serving, plan_serving, run_in_short_lived_thread, start_engine

        app_config = ScaleoutConfig.model_validate(config)
        context = serve.get_replica_context()
        self.rank = replica_rank(context)
        base = app_config.replica_engine_settings(self.rank)
        budget = replica_memory_budget(app_config.num_gpus, base.memory_budget)
        settings = base.model_copy(update={"memory_budget": budget})
        planned = plan_serving(settings)
        loaded = await run_in_short_lived_thread(load_serving, planned, settings)
        started = await start_engine(loaded, settings)
        self._engine = started.engine
        self._metrics = started.metrics
        self._close = started.close
        self.replica_name = context.replica_id.unique_id
        self._directory_name = app_config.directory_name
        self._metrics_address = self._serve_metrics()
        precision = str(getattr(planned.plan.precision, "value", planned.plan.precision))
        self._labels = {"precision": precision} | ({"rank": str(self.rank)} if self.rank is not None else {})
        self._register()
        logger.info(
            "replica %s (rank %s, budget %s) ready, metrics on %s",
            self.replica_name,
            self.rank,
            budget,
            self._metrics_address,
        )

    def _serve_metrics(self) -> str | None:
        """Expose this replica's registry on an ephemeral port of the node's address; returns host:port."""
        from prometheus_client import start_http_server

        host = node_address()
        try:
            server, _ = start_http_server(0, addr=host, registry=self._metrics.registry)
        except OSError:
            logger.warning("cannot serve replica metrics on %s", host, exc_info=True)
            return None
        self._metrics_server = server
        return f"{host}:{server.server_port}"

    def _register(self) -> None:
        """(Re-)register the metrics address with the directory; fire and forget."""
        if self._metrics_address is None:
            return
        from fitserve.server.scaleout.directory import get_directory

        with contextlib.suppress(Exception):  # the directory is a convenience; routing must not depend on it
            get_directory(self._directory_name, DIRECTORY_NAMESPACE).register.remote(
                self.replica_name, self._metrics_address, self._labels
            )

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[Admitted | ChoiceOutput]:
        """Admit the group, say so, then stream its outputs (called with `handle.options(stream=True)`)."""
        try:
            streams = await self._engine.generate_group(request.requests)
            yield Admitted()
            async for output in merge_streams(streams):
                yield output
        except EngineError as error:
            raise ReplicaEngineError.wrap(error) from None

    def routing_stats(self) -> dict[str, Any]:
        """The KV state the memory-aware router ranks replicas by."""
        snap = self._engine.snapshot()
        return {
            "kv_capacity_tokens": snap.kv_capacity_tokens,
            "kv_reserved_tokens": snap.kv_reserved_tokens,
            "kv_used_tokens": snap.kv_used_tokens,
            "waiting": snap.waiting,
            "running": snap.running,
            "taken_at": time.time(),
            "replica": self.replica_name,
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every `routing_stats_period_s`; also refreshes the directory entry."""
        self._register()
        return self.routing_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics: KV usage (reserved / capacity) and the waiting queue."""
        snap = self._engine.snapshot()
        usage = snap.kv_reserved_tokens / snap.kv_capacity_tokens if snap.kv_capacity_tokens else 1.0
        return {KV_USAGE_METRIC: usage, WAITING_METRIC: float(snap.waiting)}

    def info(self) -> dict[str, Any]:
        """The served model name and context length (the ingress validates requests with them)."""
        return {"model_name": self._engine.model_name, "max_model_len": self._engine.max_model_len}

    async def check_health(self) -> None:
        """Serve's health check: raises when the engine loop is dead (Serve then replaces the replica)."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        """Stop the engine and the metrics server; leave the directory."""
        with contextlib.suppress(AttributeError):
            self._metrics_server.shutdown()
        with contextlib.suppress(Exception):
            from fitserve.server.scaleout.directory import get_directory

            get_directory(self._directory_name, DIRECTORY_NAMESPACE).unregister.remote(self.replica_name)
        close = getattr(self, "_close", None)  # absent when the constructor failed
        if close is not None:
            await close()


def replica_rank(context: Any) -> int | None:
    """The replica's Serve rank (0..N-1; Ray 2.60 gives a `ReplicaRank` whose `.rank` is the global one)."""
    rank = getattr(context, "rank", None)
    rank = getattr(rank, "rank", rank)
    return rank if isinstance(rank, int) else None


def node_address() -> str:
    """The address this replica's node registered with Ray (127.0.0.1 on a loopback-only local instance)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return str(node["NodeManagerAddress"])
    return "127.0.0.1"
