"""Late binding in the memory-aware router: `RoomWaiter` holds a request until some replica has room (no Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace

from fitserve.server.scaleout.hold import RoomWaiter
from fitserve.server.scaleout.policy import HELD_AT_ROUTER, KvAutoscalingPolicy
from fitserve.server.scaleout.routing import ReplicaLoad, RoutingDecision, RoutingPolicy

FOREVER = 3600.0  # a waiter that only a room_freed() call can wake


def decision(has_room: bool, could_fit: bool = True) -> RoutingDecision:
    return RoutingDecision(["A", "B"], {"A": 0.0, "B": 0.0}, has_room=has_room, could_fit=could_fit)


def test_the_policy_says_whether_any_replica_has_room_and_whether_one_is_large_enough() -> None:
    policy = RoutingPolicy()
    loads = {"A": ReplicaLoad(256, 200, 0, 2, 0.0), "B": ReplicaLoad(768, 700, 0, 5, 0.0)}
    fits = policy.rank(loads, 50)
    assert fits.has_room and fits.could_fit and fits.ranked[0] == "A"  # A has 56 free, B 68: both fit
    full = policy.rank(loads, 100)
    assert not full.has_room and full.could_fit
    too_large = policy.rank(loads, 1000)
    assert not too_large.has_room and not too_large.could_fit


def test_holds_only_when_no_replica_has_room_but_one_could() -> None:
    waiter = RoomWaiter(max_hold_s=30.0)
    assert waiter.should_hold(decision(has_room=False))
    assert not waiter.should_hold(decision(has_room=True))
    assert not waiter.should_hold(decision(has_room=False, could_fit=False))  # sent at once; the replica rejects it
    assert not RoomWaiter(max_hold_s=0.0).should_hold(decision(has_room=False))  # holding turned off


def test_a_finished_request_wakes_the_held_one_which_gets_the_ranking_with_room() -> None:
    async def scenario() -> tuple[RoutingDecision | None, list[int]]:
        waiter = RoomWaiter(max_hold_s=FOREVER, recheck_s=FOREVER)
        rooms = iter([False, True])  # the first wake-up finds no room yet, the second does
        held_counts: list[int] = []

        def rank() -> RoutingDecision:
            held_counts.append(waiter.held)
            return decision(has_room=next(rooms))

        task = asyncio.create_task(waiter.hold(rank))
        while not task.done():  # requests finishing now and then: each wakes the held request to re-rank
            await asyncio.sleep(0.01)
            waiter.room_freed()
        got, _ = await asyncio.wait_for(task, 30)
        return got, [*held_counts, waiter.held]

    got, held = asyncio.run(scenario())
    assert got is not None and got.has_room
    assert held == [1, 1, 0]  # one request held while it re-ranked, none after


def test_held_requests_leave_oldest_first_and_newer_ones_queue_behind_even_with_room() -> None:
    """A long request waits for room; a short one arriving later would fit a gap now, but queues behind it."""

    async def scenario() -> tuple[list[str], bool]:
        waiter = RoomWaiter(max_hold_s=FOREVER, recheck_s=0.01)
        room_for_long = asyncio.Event()
        order: list[str] = []

        async def request(name: str, rank: Callable[[], RoutingDecision]) -> None:
            await waiter.hold(rank)
            order.append(name)

        long_task = asyncio.create_task(request("long", lambda: decision(has_room=room_for_long.is_set())))
        await asyncio.sleep(0.05)
        short_would_hold = waiter.should_hold(decision(has_room=True))
        short_task = asyncio.create_task(request("short", lambda: decision(has_room=True)))
        await asyncio.sleep(0.1)  # the short one has had many re-checks with room: it still waits its turn
        assert order == []
        room_for_long.set()
        await asyncio.wait_for(asyncio.gather(long_task, short_task), 30)
        return order, short_would_hold

    order, short_would_hold = asyncio.run(scenario())
    assert short_would_hold
    assert order == ["long", "short"]


def test_gives_up_after_max_hold_with_the_last_ranking() -> None:
    calls: list[int] = []

    def rank() -> RoutingDecision:
        calls.append(1)
        return decision(has_room=False)

    got, held_s = asyncio.run(RoomWaiter(max_hold_s=0.2, recheck_s=0.02).hold(rank))
    assert got is not None and not got.has_room and calls and held_s >= 0.2


def test_stops_holding_when_the_request_fits_no_replica_and_waits_while_none_is_listed() -> None:
    answers = iter([None, None, decision(has_room=False, could_fit=False)])  # replicas gone, then only a small one

    got, _ = asyncio.run(RoomWaiter(max_hold_s=FOREVER, recheck_s=0.01).hold(lambda: next(answers)))
    assert got is not None and not got.could_fit


def test_requests_held_at_the_router_count_as_waiting_for_the_autoscaler() -> None:
    """Serve's `total_queued_requests` (requests at the handle: the held ones) is pressure, rounded down so that
    momentary routing does not scale up; KV usage alone is below the threshold here."""

    def ctx(queued: float, now: float) -> SimpleNamespace:
        return SimpleNamespace(
            aggregated_metrics={"fitserve_kv_usage": {"r1": 0.5}, "fitserve_waiting": {"r1": 0.0}},
            total_queued_requests=queued,
            current_time=now,
            target_num_replicas=1,
            policy_state={},
        )

    policy = KvAutoscalingPolicy(min_replicas=1, max_replicas=2, upscale_delay_s=5.0)
    assert policy(ctx(0.4, 0.0))[0] == 1 and policy(ctx(0.4, 10.0))[0] == 1  # momentary: no pressure
    assert policy(ctx(3.0, 20.0))[0] == 1  # held requests: pressure starts
    assert policy(ctx(3.0, 26.0))[0] == 2  # sustained for the upscale delay: one more replica
    assert HELD_AT_ROUTER == "router"
