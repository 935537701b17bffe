"""Budget parsing and detection, with fake devices standing in for the machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fitserve.quant.budget import (
    GIB,
    MIB,
    Budget,
    BudgetError,
    BudgetSource,
    DeviceBudget,
    DeviceMemory,
    detect_budget,
    parse_size,
    read_cgroup_memory,
    read_device_memory,
    reserve_bytes,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GIB),
        ("24GB", 24 * 10**9),
        ("512MiB", 512 * MIB),
        ("0.5GiB", GIB // 2),
        ("123", 123),
        (" 1.5 gib ", int(1.5 * GIB)),
        ("8G", 8 * GIB),
        ("100kb", 100_000),
        ("2KiB", 2048),
        ("1TiB", 1 << 40),
        (4096, 4096),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1GiB", "0", "0GiB", "1.2.3GB", "12XB", "GiB", "1 G i B", "1e9", 0, -5])
def test_parse_size_rejects_with_clear_error(text: str | int) -> None:
    with pytest.raises(BudgetError) as info:
        parse_size(text)
    assert str(text).strip() in str(info.value) or "positive" in str(info.value)


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(BudgetError):
        parse_size(True)


def test_budget_error_is_a_value_error() -> None:
    assert issubclass(BudgetError, ValueError)


def test_reserve_is_larger_of_fraction_and_floor() -> None:
    assert reserve_bytes(80 * GIB) == 4 * GIB  # 5% of 80 GiB
    assert reserve_bytes(4 * GIB) == 512 * MIB  # 5% is 204.8 MiB, the floor wins


@dataclass
class FakeProbe:
    """A machine described by numbers: GPUs as (free, total), RAM, an optional cgroup limit."""

    gpus: list[tuple[int, int]] = field(default_factory=list)
    bf16: bool = True
    available: int = 10 * GIB
    total: int = 16 * GIB
    cgroup: tuple[int, int] | None = None
    native_bf16: bool = True  # AVX512-BF16/AMX: the plain 16-bit -> INT8 -> NF4 ladder
    rss: int = 0  # this process's resident memory

    def cuda_device_count(self) -> int:
        return len(self.gpus)

    def cuda_mem_info(self, index: int) -> tuple[int, int, BudgetSource]:
        free, total = self.gpus[index]
        return free, total, BudgetSource.CUDA

    def cuda_name(self, index: int) -> str:
        return f"fake-gpu-{index}"

    def cuda_bf16_supported(self, index: int) -> bool:
        return self.bf16

    def cpu_memory(self) -> tuple[int, int]:
        return self.available, self.total

    def cgroup_memory(self) -> tuple[int, int] | None:
        return self.cgroup

    def cpu_native_bf16(self) -> bool:
        return self.native_bf16

    def process_rss(self) -> int:
        return self.rss


def test_cpu_budget_is_available_minus_reserve() -> None:
    budget = detect_budget(probe=FakeProbe())
    (dev,) = budget.devices
    assert budget.device == "cpu" and not budget.is_cuda
    assert dev.reserve_bytes == int(16 * GIB * 0.05)
    assert budget.budget_bytes == 10 * GIB - int(16 * GIB * 0.05)
    assert dev.source is BudgetSource.PSUTIL


def test_cpu_budget_capped_by_cgroup_limit() -> None:
    budget = detect_budget(probe=FakeProbe(cgroup=(4 * GIB, 1 * GIB)))
    (dev,) = budget.devices
    assert dev.total_bytes == 4 * GIB
    assert dev.free_bytes == 3 * GIB
    assert dev.reserve_bytes == 512 * MIB
    assert budget.budget_bytes == 3 * GIB - 512 * MIB
    assert dev.source is BudgetSource.CGROUP


def test_cpu_budget_never_negative() -> None:
    assert detect_budget(probe=FakeProbe(available=100 * MIB, total=1 * GIB)).budget_bytes == 0


def test_user_budget_wins_on_cpu() -> None:
    budget = detect_budget("cpu", 3 * GIB, probe=FakeProbe())
    assert budget.budget_bytes == 3 * GIB and budget.user_specified
    assert budget.devices[0].source is BudgetSource.USER


def test_no_gpu_means_cpu() -> None:
    assert detect_budget(None, probe=FakeProbe()).device == "cpu"


def test_single_gpu_budget() -> None:
    budget = detect_budget(probe=FakeProbe(gpus=[(70 * GIB, 80 * GIB)]))
    assert budget.device == "cuda:0" and budget.is_cuda
    assert budget.budget_bytes == 70 * GIB - 4 * GIB
    assert budget.devices[0].name == "fake-gpu-0"


def test_multi_gpu_budget_is_the_sum_with_per_device_max_memory() -> None:
    probe = FakeProbe(gpus=[(20 * GIB, 24 * GIB), (10 * GIB, 24 * GIB)])
    budget = detect_budget(probe=probe)
    reserve = int(24 * GIB * 0.05)
    assert budget.device == "cuda"
    assert [d.budget_bytes for d in budget.devices] == [20 * GIB - reserve, 10 * GIB - reserve]
    assert budget.budget_bytes == 30 * GIB - 2 * reserve
    assert budget.max_memory() == {0: 20 * GIB - reserve, 1: 10 * GIB - reserve}


def test_user_budget_split_over_gpus_by_free_memory() -> None:
    probe = FakeProbe(gpus=[(20 * GIB, 24 * GIB), (10 * GIB, 24 * GIB)])
    budget = detect_budget("cuda", 12 * GIB, probe=probe)
    assert [d.budget_bytes for d in budget.devices] == [8 * GIB, 4 * GIB]
    assert budget.budget_bytes == 12 * GIB


def test_one_gpu_of_several() -> None:
    probe = FakeProbe(gpus=[(20 * GIB, 24 * GIB), (10 * GIB, 24 * GIB)])
    budget = detect_budget("cuda:1", probe=probe)
    assert budget.device == "cuda:1"
    assert budget.budget_bytes == 10 * GIB - int(24 * GIB * 0.05)


@pytest.mark.parametrize("device", ["tpu", "cuda:9", "cuda:x", "cuda"])
def test_bad_devices(device: str) -> None:
    probe = FakeProbe(gpus=[] if device == "cuda" else [(1 * GIB, 2 * GIB)])
    with pytest.raises(BudgetError):
        detect_budget(device, probe=probe)


def test_budget_of_devices_built_by_hand() -> None:
    devs = (
        DeviceBudget("cuda:0", 10, 8, 1, 7, BudgetSource.CUDA),
        DeviceBudget("cuda:1", 10, 6, 1, 5, BudgetSource.CUDA),
    )
    assert Budget(devs).budget_bytes == 12 and Budget(devs).device == "cuda"


def test_cgroup_v2(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("4294967296\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert read_cgroup_memory(tmp_path) == (4 * GIB, 1 * GIB)


def test_cgroup_v2_unlimited(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("max\n")
    assert read_cgroup_memory(tmp_path) is None


def test_cgroup_v1_unlimited_and_limited(tmp_path: Path) -> None:
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text(str(9223372036854771712))
    assert read_cgroup_memory(tmp_path) is None
    (v1 / "memory.limit_in_bytes").write_text(str(2 * GIB))
    (v1 / "memory.usage_in_bytes").write_text(str(GIB // 2))
    assert read_cgroup_memory(tmp_path) == (2 * GIB, GIB // 2)


def test_no_cgroup_files(tmp_path: Path) -> None:
    assert read_cgroup_memory(tmp_path) is None


def test_read_device_memory_cpu_is_process_rss() -> None:
    import psutil

    mem = read_device_memory("cpu")
    assert isinstance(mem, DeviceMemory)
    assert 0 < mem.used_bytes < mem.total_bytes
    assert abs(mem.used_bytes - psutil.Process().memory_info().rss) < 64 * MIB
    assert mem.torch_allocated_bytes is None and mem.torch_reserved_bytes is None and mem.torch_peak_bytes is None


def test_auto_cpu_budget_adds_back_what_this_process_holds() -> None:
    """psutil's "available" excludes this process; the plan counts its runtime, so the budget includes it."""
    budget = detect_budget(probe=FakeProbe(available=10 * GIB, rss=300 * MIB))
    assert budget.budget_bytes == 10 * GIB + 300 * MIB - int(16 * GIB * 0.05)
    limited = detect_budget(probe=FakeProbe(available=10 * GIB, rss=300 * MIB, cgroup=(2 * GIB, 1 * GIB)))
    assert limited.devices[0].free_bytes == 1 * GIB + 300 * MIB  # limit - usage, plus our own share of usage
    assert detect_budget(memory_budget_bytes=GIB, probe=FakeProbe(rss=300 * MIB)).budget_bytes == GIB  # user: as given
