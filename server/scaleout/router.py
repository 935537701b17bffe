"""`MemoryAwareRouter`: a Ray Serve request router that sends each request where the most KV tokens are free.

A thin adapter from Ray's `RequestRouter` API to `routing.RoutingPolicy`: it reads each replica's routing stats,
asks the policy for a ranking and returns one replica per rank (Ray then tries them in order, skipping full
ones). The request counts as in flight on the replica ranked first from that moment (Ray's `on_send_request`
carries no request id, and `on_request_routed` only fires with strict max-ongoing-requests), until Ray's
`on_request_completed` says it finished. No FIFOMixin: each routing task routes its own request, so the
ranking made for a request is the one that places it.

Late binding (opt-in: `ScaleoutConfig.router_max_hold_s` > 0): while no replica has the request's KV tokens free,
the router holds the request (up to `max_hold_s`) in one first-come-first-served queue for all replicas
(`hold.RoomWaiter`) instead of queueing it at a replica that cannot admit it; the oldest held request re-ranks the
replicas Serve lists whenever a request finishes (and every 50 ms) and goes to whichever frees room first. Serve
counts held requests as queued at the handle, which the autoscaling policy adds to its waiting count. A request
larger than every replica's capacity is sent at once (the replica rejects it cleanly). Off by default: on CPU
replicas sharing cores it measured no better than routing at once (docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fitserve.server.scaleout.hold import RoomWaiter
from fitserve.server.scaleout.metrics import router_metrics
from fitserve.server.scaleout.request import ReplicaRequest
from fitserve.server.scaleout.routing import ReplicaLoad, RoutingDecision, RoutingPolicy

DEFAULT_MAX_HOLD_S = 0.0  # late binding off unless `router_max_hold_s` turns it on


class MemoryAwareRouter(RequestRouter):
    """Most free KV tokens for the request first; prefix affinity only breaks near-ties."""

    def initialize_state(self, **kwargs: Any) -> None:
        """Called by Ray with `request_router_kwargs`."""
        self._policy = RoutingPolicy(tie_fraction=float(kwargs.get("tie_fraction", 0.02)))
        self._waiter = RoomWaiter(max_hold_s=float(kwargs.get("max_hold_s", DEFAULT_MAX_HOLD_S)))
        self._metrics = router_metrics()
        self._metrics.held.set_function(lambda: self._waiter.held)  # read at scrape time
        self._by_affinity: dict[str, bool] = {}  # internal request id -> the last ranking was an affinity tie-break

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, best first; held first while no replica has room for the request."""
        if not candidate_replicas:
            return []
        request = _replica_request(pending_request)
        decision, by_id = self._rank(candidate_replicas, request)
        if pending_request is not None and self._waiter.should_hold(decision):
            decision, by_id = await self._hold(request, decision, by_id)
        elif pending_request is not None:
            self._metrics.hold_seconds.observe(0.0)
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

    def _rank(
        self, replicas: Sequence[RunningReplica], request: ReplicaRequest | None
    ) -> tuple[RoutingDecision, dict[ReplicaID, RunningReplica]]:
        """The policy's ranking of `replicas` (by their latest routing stats) for `request`."""
        by_id = {replica.replica_id: replica for replica in replicas}
        loads = {rid: ReplicaLoad.from_stats(replica.routing_stats) for rid, replica in by_id.items()}
        decision = self._policy.rank(
            loads,
            request.kv_tokens if request else 1,
            request.prompt_token_ids if request else (),
        )
        return decision, by_id

    async def _hold(
        self,
        request: ReplicaRequest | None,
        decision: RoutingDecision,
        by_id: dict[ReplicaID, RunningReplica],
    ) -> tuple[RoutingDecision, dict[ReplicaID, RunningReplica]]:
        """Hold `request` until the replicas Serve lists have room for it (`RoomWaiter.hold`)."""
        latest = (decision, by_id)

        def rank() -> RoutingDecision | None:
            nonlocal latest
            replicas = list(self.curr_replicas.values())
            if not replicas:
                return None
            latest = self._rank(replicas, request)
            return latest[0]

        _, held_s = await self._waiter.hold(rank)  # `latest`: the last ranking made (before holding, if none since)
        self._metrics.hold_seconds.observe(held_s)
        return latest

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """The request finished (or failed) on `replica_id`: count the decision, stop counting it in flight."""
        self._policy.on_finished(internal_request_id)
        self._waiter.room_freed()
        reason = "prefix_affinity" if self._by_affinity.pop(internal_request_id, False) else "free_kv"
        self._metrics.decisions.labels(replica_id.unique_id, reason).inc()
        self._metrics.in_flight.labels(replica_id.unique_id).set(self._policy.in_flight(replica_id))

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Forget a dead replica (Ray replaces it)."""
        super().on_replica_actor_died(replica_id)
        self._policy.on_replica_gone(replica_id)
        self._waiter.room_freed()  # held requests re-rank over the replicas left
        self._metrics.forget(replica_id.unique_id)


def _replica_request(pending_request: PendingRequest | None) -> ReplicaRequest | None:
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    return first if isinstance(first, ReplicaRequest) else None


def _name(replica_id: Any) -> str:
    """The `replica` label of a ReplicaID (Serve's short unique id, as in the replica metrics' targets)."""
    return str(getattr(replica_id, "unique_id", replica_id))
