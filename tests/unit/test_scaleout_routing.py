"""The memory-aware routing policy (server/scaleout/routing.py) on fake replica stats: no Ray involved."""

from __future__ import annotations

import itertools
from collections import Counter

from fitserve.server.scaleout.routing import ReplicaLoad, RoutingPolicy

CAPACITY = 4096


def load(usage: float, capacity: int = CAPACITY, waiting: int = 0, running: int = 0, taken_at: float = 0.0):
    return ReplicaLoad(capacity, int(usage * capacity), waiting, running, taken_at)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def route(policy: RoutingPolicy, loads: dict, request_id: str, tokens: int, prompt: tuple[int, ...] = ()) -> str:
    winner = policy.rank(loads, tokens, prompt).ranked[0]
    policy.on_sent(request_id, winner, tokens, prompt)
    return winner


def test_replica_at_90_percent_gets_few_of_50_short_requests() -> None:
    """A at 90% KV usage, B at 10%: at least 85% of 50 short requests go to B (stats never refresh here)."""
    policy = RoutingPolicy(clock=Clock())
    loads = {"A": load(0.9), "B": load(0.1)}
    counts = Counter(route(policy, loads, f"r{i}", tokens=40) for i in range(50))
    assert counts["B"] >= 0.85 * 50, counts


def test_eight_simultaneous_long_requests_split_no_worse_than_5_3() -> None:
    """Equal stats that lag behind: the router's own in-flight count spreads a burst over both replicas."""
    policy = RoutingPolicy(clock=Clock())
    loads = {"A": load(0.0), "B": load(0.0)}
    counts = Counter(route(policy, loads, f"r{i}", tokens=1500) for i in range(8))
    assert max(counts.values()) <= 5 and min(counts.values()) >= 3, counts


def test_in_flight_correction_only_counts_requests_the_stats_have_not_seen() -> None:
    clock = Clock()
    policy = RoutingPolicy(clock=clock)
    policy.on_sent("old", "A", 1000)
    clock.now = 200.0
    fresh = {"A": load(0.0, taken_at=150.0), "B": load(0.0, taken_at=150.0)}
    # the stats were taken after "old" was sent: it is already in A's reserved tokens, so no double counting
    assert policy.rank(fresh, 10).scores["A"] == CAPACITY
    policy.on_sent("new", "A", 1000)
    assert policy.rank(fresh, 10).scores["A"] == CAPACITY - 1000
    policy.on_finished("new")
    assert policy.rank(fresh, 10).scores["A"] == CAPACITY


def test_requests_finished_since_the_stats_give_their_tokens_back() -> None:
    """Stale stats still show a finished request's reservation; the router knows it ended and does not herd."""
    clock = Clock()
    policy = RoutingPolicy(clock=clock)
    policy.on_sent("long", "A", 3000)
    clock.now = 101.0
    stale = {"A": ReplicaLoad(CAPACITY, 3000, 0, 1, taken_at=100.5), "B": load(0.5, taken_at=100.5)}
    assert policy.rank(stale, 10).ranked[0] == "B"
    clock.now = 102.0
    policy.on_finished("long")
    assert policy.rank(stale, 10).scores["A"] == CAPACITY
    assert policy.rank(stale, 10).ranked[0] == "A"


def test_waiting_queue_counts_against_a_replica() -> None:
    policy = RoutingPolicy(clock=Clock())
    loads = {"A": load(0.2, waiting=6), "B": load(0.4)}
    assert policy.rank(loads, 100).ranked[0] == "B"


def test_prefix_affinity_breaks_ties_only() -> None:
    policy = RoutingPolicy(clock=Clock())
    prompt = tuple(range(100))
    policy.on_sent("first", "B", 10, prompt)
    policy.on_finished("first")
    tie = {"A": load(0.30), "B": load(0.31)}  # within 2% of capacity
    decision = policy.rank(tie, 10, prompt)
    assert decision.ranked[0] == "B" and decision.by_affinity
    far = {"A": load(0.10), "B": load(0.60)}
    decision = policy.rank(far, 10, prompt)
    assert decision.ranked[0] == "A" and not decision.by_affinity


def test_replica_without_stats_ranks_as_empty_but_counts_what_was_sent() -> None:
    policy = RoutingPolicy(clock=Clock())
    loads = {"A": load(0.5), "new": None}
    assert policy.rank(loads, 10).ranked[0] == "new"
    policy.on_sent("r1", "new", 3000)
    assert policy.rank(loads, 10).ranked[0] == "A"


def test_dead_replica_is_forgotten() -> None:
    policy = RoutingPolicy(clock=Clock())
    policy.on_sent("r1", "A", 100, tuple(range(64)))
    policy.on_replica_gone("A")
    assert policy.in_flight("A") == 0


def test_stats_parse_and_reject_incomplete() -> None:
    stats = {"kv_capacity_tokens": 100, "kv_reserved_tokens": 25, "waiting": 1, "running": 2, "taken_at": 5.0}
    parsed = ReplicaLoad.from_stats(stats)
    assert parsed is not None and parsed.kv_free_tokens == 75 and parsed.kv_usage == 0.25
    assert ReplicaLoad.from_stats({}) is None
    assert ReplicaLoad.from_stats({**stats, "waiting": "x"}) is None


def simulate_saturated(capacities: dict[str, int], policy: RoutingPolicy | None, ticks: int = 2000) -> tuple:
    """Two replicas serving 100-token requests that each last 10 ticks; arrivals always outpace them.

    The router sees stats one tick late. A request routed to a replica with no room for it is a rejection
    (what a client would see as a 429/503). `policy=None` routes round-robin (load-blind), for contrast.
    """
    tokens, duration = 100, 10
    running: dict[str, list[int]] = {name: [] for name in capacities}  # end ticks
    served, rejected = Counter(), 0
    stale = {name: ReplicaLoad(cap, 0, 0, 0, -1.0) for name, cap in capacities.items()}
    rr = itertools.cycle(capacities)
    clock = Clock()
    if policy is not None:
        policy.clock = clock
    request_ids = itertools.count()
    pending: list[tuple[int, str]] = []  # (end tick, request id) of what the policy counts in flight
    for tick in range(ticks):
        clock.now = float(tick)
        for name in capacities:
            for end in [end for end in running[name] if end <= tick]:
                running[name].remove(end)
                served[name] += 1
        fresh = {
            n: ReplicaLoad(c, len(running[n]) * tokens, 0, len(running[n]), tick - 0.5) for n, c in capacities.items()
        }
        for _ in range(4):  # offered load: more than both replicas together complete
            if policy is None:
                name = next(rr)
            else:
                decision = policy.rank(stale, tokens)
                name = decision.ranked[0]
                if decision.scores[name] < tokens:
                    break  # nobody has room: the request waits at the router (Ray backs off and retries)
            if (len(running[name]) + 1) * tokens > capacities[name]:
                rejected += 1
                continue
            running[name].append(tick + duration)
            if policy is not None:
                request_id = f"r{next(request_ids)}"
                policy.on_sent(request_id, name, tokens)
                pending.append((tick + duration, request_id))
        if policy is not None:
            for end, request_id in [p for p in pending if p[0] <= tick + 1]:
                policy.on_finished(request_id)
                pending.remove((end, request_id))
        stale = fresh
    return served, rejected


def test_heterogeneous_capacities_serve_load_in_their_ratio_with_no_rejections() -> None:
    """KV capacities 1:3, saturated: requests served in that ratio (+-10%) and none refused."""
    served, rejected = simulate_saturated({"small": 1000, "big": 3000}, RoutingPolicy())
    assert rejected == 0
    ratio = served["big"] / served["small"]
    assert 3 * 0.9 <= ratio <= 3 * 1.1, served
    _, blind_rejected = simulate_saturated({"small": 1000, "big": 3000}, None)
    assert blind_rejected > 0  # the contrast: a load-blind router overfills the small replica


def test_a_burst_beyond_both_capacities_is_split_in_their_ratio() -> None:
    """KV capacities 1:3, stats not yet updated, a burst twice what both hold: placed 1:3, not filled to equal room.

    Ranking by free tokens alone would fill the big replica down to the small one's room and then alternate
    (here 22/42); ranking by the free fraction of each replica's own capacity keeps both equally full.
    """
    policy = RoutingPolicy(clock=Clock())
    loads = {"small": ReplicaLoad(512, 0, 0, 0, 0.0), "big": ReplicaLoad(1536, 0, 0, 0, 0.0)}
    placed = Counter(route(policy, loads, f"r{i}", 53) for i in range(64))
    assert placed["small"] + placed["big"] == 64
    assert 3 * 0.9 <= placed["big"] / placed["small"] <= 3 * 1.1, placed


def test_a_request_goes_where_it_fits_before_where_the_fraction_is_free() -> None:
    policy = RoutingPolicy(clock=Clock())
    loads = {"small": ReplicaLoad(512, 312, 0, 0, 0.0), "big": ReplicaLoad(4096, 3500, 0, 0, 0.0)}
    assert policy.rank(loads, 300).ranked[0] == "big"  # 39% free of 512 is 200 tokens: too few for 300
    assert policy.rank(loads, 100).ranked[0] == "small"  # both fit: the emptier fraction wins
