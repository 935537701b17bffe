"""MemoryLedger arithmetic and make_ledger_fn reading device memory at call time."""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.server.ledger import MemoryLedger, build_ledger, make_ledger_fn

MiB = 2**20


@dataclass
class FakeShare:
    device: str
    budget_bytes: int
    weights_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int


@dataclass
class FakePlan:
    budget_bytes: int = 4096 * MiB
    weights_bytes: int = 260 * MiB
    kv_cache_bytes: int = 92_160 * 8192
    overhead_bytes: int = 300 * MiB
    device_split: tuple[FakeShare, ...] = ()


@dataclass
class FakeLoadReport:
    measured_weights_bytes: int = 257 * MiB
    predicted_weights_bytes: int = 260 * MiB
    measured_weights_by_device: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeMemory:
    total_bytes: int
    used_bytes: int
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    torch_peak_bytes: int | None = None


def test_ledger_arithmetic() -> None:
    ledger = build_ledger(
        "cpu", FakePlan(), FakeLoadReport(), FakeMemory(total_bytes=24 * 1024 * MiB, used_bytes=900 * MiB)
    )
    assert ledger.device == "cpu"
    assert ledger.budget_bytes == 4096 * MiB
    assert ledger.headroom_bytes == (4096 - 900) * MiB
    assert ledger.weights_bytes == 257 * MiB
    assert ledger.predicted_weights_bytes == 260 * MiB
    assert ledger.predicted_kv_cache_bytes == 92_160 * 8192
    assert ledger.predicted_overhead_bytes == 300 * MiB
    assert ledger.predicted_total_bytes == 560 * MiB + 92_160 * 8192
    assert ledger.weights_prediction_error_bytes == -3 * MiB
    assert ledger.torch_allocated_bytes is None and ledger.torch_peak_bytes is None


def test_headroom_goes_negative_over_budget() -> None:
    ledger = MemoryLedger("cpu", 100, 1000, 150, 10, 10, 10, 10)
    assert ledger.headroom_bytes == -50


def test_make_ledger_fn_reads_memory_for_its_device_on_every_call() -> None:
    readings = [
        FakeMemory(80 * 1024 * MiB, 1024 * MiB, 700 * MiB, 800 * MiB, 750 * MiB),
        FakeMemory(80 * 1024 * MiB, 2048 * MiB, 1700 * MiB, 1800 * MiB, 1750 * MiB),
    ]
    asked: list[str] = []

    def read_memory(device: str) -> FakeMemory:
        asked.append(device)
        return readings[len(asked) - 1]

    ledger_fn = make_ledger_fn(FakePlan(), FakeLoadReport(), "cuda:0", read_memory=read_memory)
    assert asked == []  # nothing is read until a scrape asks
    (first,), (second,) = ledger_fn(), ledger_fn()
    assert asked == ["cuda:0", "cuda:0"]
    assert first.used_bytes == 1024 * MiB and second.used_bytes == 2048 * MiB
    assert first.headroom_bytes - second.headroom_bytes == 1024 * MiB
    assert second.torch_allocated_bytes == 1700 * MiB
    assert second.torch_reserved_bytes == 1800 * MiB
    assert second.torch_peak_bytes == 1750 * MiB
    assert first.weights_bytes == second.weights_bytes == 257 * MiB


def test_default_reader_on_cpu_reports_rss_and_no_torch_stats() -> None:
    import psutil

    (ledger,) = make_ledger_fn(FakePlan(), FakeLoadReport(), "cpu")()
    assert ledger.total_bytes == psutil.virtual_memory().total
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < ledger.used_bytes < 2 * rss
    assert ledger.torch_allocated_bytes is None
    assert ledger.torch_reserved_bytes is None
    assert ledger.torch_peak_bytes is None
    assert ledger.headroom_bytes == FakePlan().budget_bytes - ledger.used_bytes


def test_one_ledger_per_device_of_a_multi_gpu_split() -> None:
    shares = (
        FakeShare("cuda:0", 10_000 * MiB, 3000 * MiB, 900 * MiB, 40_000 * 65_536),
        FakeShare("cuda:1", 6_000 * MiB, 2000 * MiB, 850 * MiB, 20_000 * 65_536),
    )
    plan = FakePlan(budget_bytes=16_000 * MiB, weights_bytes=5000 * MiB, device_split=shares)
    report = FakeLoadReport(measured_weights_by_device={"cuda:0": 2990 * MiB, "cuda:1": 1995 * MiB})
    asked: list[str] = []

    def read_memory(device: str) -> FakeMemory:
        asked.append(device)
        return FakeMemory(80_000 * MiB, (4000 if device == "cuda:0" else 3000) * MiB)

    first, second = make_ledger_fn(plan, report, "cuda", read_memory=read_memory)()
    assert asked == ["cuda:0", "cuda:1"]  # each GPU read on its own, never the "cuda" sum
    assert (first.device, first.budget_bytes, first.headroom_bytes) == ("cuda:0", 10_000 * MiB, 6000 * MiB)
    assert (second.device, second.budget_bytes, second.headroom_bytes) == ("cuda:1", 6_000 * MiB, 3000 * MiB)
    assert first.predicted_kv_cache_bytes == 40_000 * 65_536 and second.predicted_kv_cache_bytes == 20_000 * 65_536
    assert (first.predicted_weights_bytes, second.predicted_weights_bytes) == (3000 * MiB, 2000 * MiB)
    assert (first.weights_bytes, second.weights_bytes) == (2990 * MiB, 1995 * MiB)
    assert first.predicted_overhead_bytes == 900 * MiB and second.predicted_overhead_bytes == 850 * MiB


def test_single_device_predicts_the_block_aligned_cache_the_engine_holds() -> None:
    from fitserve.quant.plan import PlanRequest, make_plan
    from fitserve.server.engine.config import EngineConfig
    from tests.unit.test_budget import FakeProbe
    from tests.unit.test_plan import SHAPE

    plan = make_plan(
        PlanRequest(model="/fake", memory_budget_bytes=5 * 2**30 + 12_345, max_num_seqs=256),
        probe=FakeProbe(),
        shape=SHAPE,
    )
    config = EngineConfig(
        served_model_name="m",
        max_model_len=plan.max_model_len,
        kv_capacity_tokens=plan.kv_capacity_tokens,
        block_size_tokens=plan.block_size_tokens,
        spare_bytes=plan.spare_bytes,
    )
    (ledger,) = make_ledger_fn(plan, FakeLoadReport(), "cpu", read_memory=lambda _d: FakeMemory(1, 1))()
    # the engine's cache: the pool's blocks plus the scratch block (server/engine/kv_cache.py)
    cache_blocks = config.num_kv_blocks + 1
    assert ledger.predicted_kv_cache_bytes == cache_blocks * config.block_size_tokens * plan.kv_bytes_per_token
    assert ledger.predicted_total_bytes + plan.quant_state_bytes + plan.spare_bytes == plan.budget_bytes
