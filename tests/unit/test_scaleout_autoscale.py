"""The KV autoscaler (server/scaleout/autoscale.py) and the per-replica budget arithmetic, without Ray."""

from __future__ import annotations

import pytest

from fitserve.server.scaleout.autoscale import AutoscaleConfig, KvAutoscaler, ScaleDirection
from fitserve.server.scaleout.budget import gpu_share_bytes
from fitserve.server.scaleout.errors import ReplicaEngineError

GIB = 1024**3


def run(scaler: KvAutoscaler, replicas: int, seconds: int, usage: float, waiting: float = 0.0, start: int = 0):
    """Tick once a second; the replica count follows the decisions. Returns (replicas, [(t, event)])."""
    events = []
    for t in range(start, start + seconds):
        names = [f"r{i}" for i in range(replicas)]
        decision = scaler.decide(float(t), replicas, dict.fromkeys(names, usage), dict.fromkeys(names, waiting))
        if decision.event is not None:
            events.append((t - start, decision.event))
        replicas = decision.target_replicas
    return replicas, events


def test_scales_up_within_20_s_of_sustained_kv_pressure() -> None:
    scaler = KvAutoscaler(AutoscaleConfig(min_replicas=1, max_replicas=2))
    replicas, events = run(scaler, 1, 30, usage=0.95)
    assert replicas == 2
    assert events == [(5, ScaleDirection.UP)]


def test_a_waiting_queue_alone_is_pressure() -> None:
    scaler = KvAutoscaler(AutoscaleConfig(min_replicas=1, max_replicas=2))
    replicas, events = run(scaler, 1, 30, usage=0.3, waiting=2)
    assert replicas == 2 and len(events) == 1


def test_scales_down_within_30_s_of_idleness() -> None:
    scaler = KvAutoscaler(AutoscaleConfig(min_replicas=1, max_replicas=2))
    replicas, events = run(scaler, 2, 40, usage=0.0)
    assert replicas == 1
    assert events == [(15, ScaleDirection.DOWN)]


def test_no_flapping_under_steady_or_jittery_load() -> None:
    """At most one event per direction in 60 s: steady load holds, short spikes never reach the delays."""
    scaler = KvAutoscaler(AutoscaleConfig(min_replicas=1, max_replicas=2))
    replicas, events = run(scaler, 2, 60, usage=0.5)
    assert (replicas, events) == (2, [])
    replicas = 1
    all_events = []
    for second in range(60):
        usage = 0.95 if second % 4 < 2 else 0.05  # 2 s bursts, 2 s idle
        replicas, events = run(scaler, replicas, 1, usage=usage, start=second)
        all_events += events
    assert all_events == []
    replicas, events = run(scaler, 1, 60, usage=0.95, start=100)  # steady saturation at max: one event
    assert replicas == 2 and len(events) == 1


def test_bounds_and_config_validation() -> None:
    scaler = KvAutoscaler(AutoscaleConfig(min_replicas=2, max_replicas=3))
    assert scaler.decide(0.0, 1, {"a": 0.0}, {"a": 0.0}).target_replicas == 2
    assert scaler.decide(0.0, 2, {}, {}).target_replicas == 2  # no metrics yet: hold
    with pytest.raises(ValueError):
        AutoscaleConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        AutoscaleConfig(kv_usage_low=0.9, kv_usage_high=0.5)


def test_half_a_gpu_plans_inside_half_the_device() -> None:
    total = 80 * GIB
    share = gpu_share_bytes(total, free_bytes=total, gpu_fraction=0.5)
    assert share <= total / 2
    assert share == int(0.5 * (total - 4 * GIB))  # 5% reserve of 80 GiB, halved
    # the neighbour loaded first and holds most of the device: never more than is free
    assert gpu_share_bytes(total, free_bytes=10 * GIB, gpu_fraction=0.5) <= 10 * GIB
    with pytest.raises(ValueError):
        gpu_share_bytes(total, total, 0.0)


def test_engine_errors_survive_pickling_through_the_wrapper() -> None:
    import pickle

    from fitserve.server.engine.types import PromptTooLongError, QueueFullError
    from fitserve.server.protocol.errors import http_mapping_for

    error = pickle.loads(pickle.dumps(ReplicaEngineError.wrap(QueueFullError(8, retry_after_s=3)))).unwrap()
    assert isinstance(error, QueueFullError) and error.retry_after_s == 3
    assert http_mapping_for(error).status_code == 429
    error = pickle.loads(pickle.dumps(ReplicaEngineError.wrap(PromptTooLongError(10, 5, 12, "context")))).unwrap()
    assert (
        isinstance(error, PromptTooLongError)
        and "15 tokens" in str(error)
        and http_mapping_for(error).code == "context_length_exceeded"
    )
