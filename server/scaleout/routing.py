"""Memory-aware replica ranking: pure logic behind the Ray Serve request router (no Ray here).

Each replica reports its KV cache state in its routing stats. A request goes to the replica with the most free
KV tokens *for it*: free = capacity - reserved - (waiting queue x the mean request size) - the tokens of the
requests this router has sent there since the replica took its stats (stats lag; without that correction a
burst would all land on the replica that looked emptiest). Prefix-cache affinity only breaks near-ties.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Routing-stats keys a replica reports (`EngineReplica.record_routing_stats`).
STATS_KEYS = ("kv_capacity_tokens", "kv_reserved_tokens", "waiting", "running", "taken_at")

PREFIX_TOKENS = 64  # prompt tokens hashed for prefix affinity (a few KV blocks)
MIN_PREFIX_TOKENS = 16  # shorter prompts have no useful prefix to share


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's KV cache state, as reported in its routing stats."""

    kv_capacity_tokens: int
    kv_reserved_tokens: int
    waiting: int
    running: int
    taken_at: float  # wall-clock time the replica read its engine snapshot

    @property
    def kv_free_tokens(self) -> int:
        """KV tokens not held by admitted requests."""
        return max(self.kv_capacity_tokens - self.kv_reserved_tokens, 0)

    @property
    def kv_usage(self) -> float:
        """Reserved over capacity (0 to 1)."""
        return self.kv_reserved_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 1.0

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any] | None) -> ReplicaLoad | None:
        """Parse routing stats; None when the replica has not reported (yet) or reported something else."""
        if not stats or any(key not in stats for key in STATS_KEYS):
            return None
        try:
            return cls(
                kv_capacity_tokens=int(stats["kv_capacity_tokens"]),
                kv_reserved_tokens=int(stats["kv_reserved_tokens"]),
                waiting=int(stats["waiting"]),
                running=int(stats["running"]),
                taken_at=float(stats["taken_at"]),
            )
        except (TypeError, ValueError):
            return None


@dataclass
class _InFlight:
    replica: Hashable
    tokens: int
    sent_at: float
    finished_at: float | None = None


FINISHED_MEMORY_S = 30.0  # finished requests are remembered this long (longer than any stats lag)


@dataclass
class RoutingDecision:
    """The ranked replicas for one request and why the first one won."""

    ranked: list[Hashable]
    scores: dict[Hashable, float]
    by_affinity: bool = False
    has_room: bool = True  # some replica has the request's KV tokens free now
    could_fit: bool = True  # the request is no larger than the largest replica's capacity


@dataclass
class RoutingPolicy:
    """Ranks replicas by free KV tokens for a request, corrected by this router's own in-flight count.

    `tie_fraction`: free fractions of capacity within this of the best replica's count as a tie, which the
    replica that last served the same prompt prefix wins (its prefix cache may hold those blocks).
    """

    tie_fraction: float = 0.02
    affinity_entries: int = 4096
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    _in_flight: dict[str, _InFlight] = field(default_factory=dict)
    _finished: list[_InFlight] = field(default_factory=list)
    _prefix_owner: OrderedDict[int, Hashable] = field(default_factory=OrderedDict)
    _mean_request_tokens: float = 256.0

    def rank(
        self,
        loads: Mapping[Hashable, ReplicaLoad | None],
        request_tokens: int,
        prompt_token_ids: Sequence[int] = (),
    ) -> RoutingDecision:
        """Replicas best first. Replicas without stats rank as empty ones of the largest known capacity.

        Replicas with room for the request come first; among them (and among the rest, when none has room) the
        one with the largest free fraction of its own capacity wins. With equal capacities that is the most free
        tokens; with unequal ones it keeps every replica equally full, so saturated replicas take load in the
        ratio of their capacities (a queue included) instead of the big one being filled down to the small one.
        """
        if not loads:
            return RoutingDecision([], {})
        known = [load for load in loads.values() if load is not None]
        default_capacity = max((load.kv_capacity_tokens for load in known), default=0)
        scores = {replica: self._score(replica, load, default_capacity) for replica, load in loads.items()}
        capacity = {
            replica: max(load.kv_capacity_tokens if load is not None else default_capacity, 1)
            for replica, load in loads.items()
        }
        headroom = {replica: scores[replica] / capacity[replica] for replica in scores}
        fits = {replica: scores[replica] >= request_tokens for replica in scores}
        jitter = {replica: self.rng.random() for replica in scores}  # equal scores: no replica is favoured
        ordered = sorted(scores, key=lambda replica: (fits[replica], headroom[replica], jitter[replica]), reverse=True)
        best = ordered[0]
        key = prefix_key(prompt_token_ids)
        owner = self._prefix_owner.get(key) if key is not None else None
        by_affinity = (
            owner is not None
            and owner in scores
            and owner != best
            and fits[owner] >= fits[best]
            and headroom[owner] >= headroom[best] - self.tie_fraction
        )
        if by_affinity:
            ordered.remove(owner)
            ordered.insert(0, owner)
        has_room = any(fits.values())
        return RoutingDecision(ordered, scores, by_affinity, has_room, request_tokens <= max(capacity.values()))

    def _score(self, replica: Hashable, load: ReplicaLoad | None, default_capacity: int) -> float:
        """Free KV tokens left for a new request on `replica`: its stats, corrected by what this router saw since.

        Requests sent after the stats were taken are not in them yet (subtract their tokens); requests that were
        in them and have finished since no longer hold their tokens (add them back); the waiting queue will need
        the mean request size each.
        """
        if load is None:  # no stats: everything we sent it and is still running is unseen
            unseen = sum(flight.tokens for flight in self._in_flight.values() if flight.replica == replica)
            return default_capacity - unseen
        unseen = sum(
            flight.tokens
            for flight in self._in_flight.values()
            if flight.replica == replica and flight.sent_at > load.taken_at
        )
        gone = [
            flight
            for flight in self._finished
            if flight.replica == replica and flight.sent_at <= load.taken_at < (flight.finished_at or 0.0)
        ]
        free = min(load.kv_free_tokens + sum(flight.tokens for flight in gone), load.kv_capacity_tokens)
        waiting = max(load.waiting - len(gone), 0)  # a request that ended was running or waiting: both shrink
        return free - waiting * self._mean_request_tokens - unseen

    def on_sent(
        self, request_id: str, replica: Hashable, request_tokens: int, prompt_token_ids: Sequence[int] = ()
    ) -> None:
        """Count a request as in flight on `replica` and remember it as the owner of the prompt's prefix."""
        self._in_flight[request_id] = _InFlight(replica, request_tokens, self.clock())
        self._mean_request_tokens += 0.05 * (request_tokens - self._mean_request_tokens)
        key = prefix_key(prompt_token_ids)
        if key is not None:
            self._prefix_owner[key] = replica
            self._prefix_owner.move_to_end(key)
            while len(self._prefix_owner) > self.affinity_entries:
                self._prefix_owner.popitem(last=False)

    def on_finished(self, request_id: str) -> None:
        """A request finished (or failed): it holds no KV any more; unknown ids are ignored."""
        flight = self._in_flight.pop(request_id, None)
        now = self.clock()
        self._finished = [done for done in self._finished if now - (done.finished_at or now) <= FINISHED_MEMORY_S]
        if flight is not None:
            flight.finished_at = now
            self._finished.append(flight)

    def on_replica_gone(self, replica: Hashable) -> None:
        """Forget everything about a replica that died or was removed."""
        for request_id in [rid for rid, flight in self._in_flight.items() if flight.replica == replica]:
            del self._in_flight[request_id]
        self._finished = [done for done in self._finished if done.replica != replica]
        for key in [key for key, owner in self._prefix_owner.items() if owner == replica]:
            del self._prefix_owner[key]

    def in_flight(self, replica: Hashable) -> int:
        """Requests sent to `replica` and not yet seen to finish."""
        return sum(1 for flight in self._in_flight.values() if flight.replica == replica)


def prefix_key(prompt_token_ids: Sequence[int]) -> int | None:
    """Hash of the prompt's first `PREFIX_TOKENS` tokens; None for prompts too short to share a prefix."""
    if len(prompt_token_ids) < MIN_PREFIX_TOKENS:
        return None
    return hash(tuple(prompt_token_ids[:PREFIX_TOKENS]))
