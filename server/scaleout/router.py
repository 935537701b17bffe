"""`MemoryAwareRouter`: a Ray Serve request router that sends each request where the most KV tokens are free.

A thin adapter from Ray's `RequestRouter` API to `routing.RoutingPolicy`: it reads each replica's routing stats,
asks the policy for a ranking and returns one replica per rank (Ray then tries them in order, skipping full
ones). The request counts as in flight on the replica ranked first from that moment (Ray's `on_send_request`
carries no request id, and `on_request_routed` only fires with strict max-ongoing-requests), until Ray's
`on_request_completed` says it finished. No FIFOMixin: each routing task routes its own request, so the
ranking made for a request is the one that places it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fitserve.server.scaleout.metrics import router_metrics
from fitserve.server.scaleout.request import ReplicaRequest
from fitserve.server.scaleout.routing import ReplicaLoad, RoutingPolicy


class MemoryAwareRouter(RequestRouter):
    """Most free KV tokens for the request first; prefix affinity only breaks near-ties."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Ray with `request_router_kwargs`."""
        self._policy = RoutingPolicy(tie_fraction=float(kwargs.get("tie_fraction", 0.02)))
        self._metrics = router_metrics()
        self._by_affinity: dict[str, bool] = {}  # internal request id -> the last ranking was an affinity tie-break

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, best first."""
        if not candidate_replicas:
            return []
        request = _replica_request(pending_request)
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        loads = {rid: ReplicaLoad.from_stats(replica.routing_stats) for rid, replica in by_id.items()}
        decision = self._policy.rank(
            loads,
            request.kv_tokens if request else 1,
            request.prompt_token_ids if request else (),
        )
        for rid, score in decision.scores.items():
            self._metrics.free_kv_tokens.labels(_name(rid)).set(score)
        if pending_request is not None and decision.ranked:
            request_id = pending_request.metadata.internal_request_id
            self._by_affinity[request_id] = decision.by_affinity
            first = decision.ranked[0]
            self._policy.on_sent(
                request_id, first, request.kv_tokens if request else 1, request.prompt_token_ids if request else ()
            )
            self._metrics.in_flight.labels(_name(first)).set(self._policy.in_flight(first))
        return [[by_id[rid]] for rid in decision.ranked]

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The request finished (or failed) on `replica_id`: count the decision, stop counting it in flight."""
        self._policy.on_finished(internal_request_id)
        reason = "prefix_affinity" if self._by_affinity.pop(internal_request_id, False) else "free_kv"
        self._metrics.decisions.labels(replica_id.unique_id, reason).inc()
        self._metrics.in_flight.labels(replica_id.unique_id).set(self._policy.in_flight(replica_id))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica (Ray replaces it)."""
        super().on_replica_actor_died(replica_id)
        self._policy.on_replica_gone(replica_id)
        self._metrics.forget(replica_id.unique_id)


def _replica_request(pending_request: PendingRequest | None) -> ReplicaRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, ReplicaRequest) else None


def _name(replica_id: Any) -> str:
    """The `replica` label of a ReplicaID (Serve's short unique id, as in the replica metrics' targets)."""
    return str(getattr(replica_id, "unique_id", replica_id))
