"""The memory ledger: what the plan predicted, what loading measured, and what the device holds right now.

Plain dataclasses, no prometheus_client and no torch: `server.metrics` turns `MemoryLedger`s into gauges at
scrape time. `make_ledger_fn` binds the start-up facts (plan, load report) to a function that reads each
device's memory afresh on every call, through `quant.budget.read_device_memory`: one ledger per device of the
plan's split (one on CPU or a single GPU; one per GPU when the layers are spread over several).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ModelInfo:
    """Labels of `fitserve_model_info`: what is being served and how."""

    model: str
    precision: str
    quant_method: str  # "none", "bitsandbytes", ...
    dtype: str  # compute dtype, e.g. "bfloat16"
    device: str  # "cuda:0", "cpu", ...


@dataclass(frozen=True)
class MemoryLedger:
    """One reading of the memory accounts of a device, in bytes.

    `torch_*` fields are None where torch keeps no allocator statistics (CPU); they are then exported as
    absent series, never as zero.
    """

    device: str
    budget_bytes: int
    total_bytes: int
    used_bytes: int  # CUDA: used per NVML / mem_get_info; CPU: this process's RSS
    weights_bytes: int  # measured after loading
    predicted_weights_bytes: int
    predicted_kv_cache_bytes: int
    predicted_overhead_bytes: int
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    torch_peak_bytes: int | None = None

    @property
    def headroom_bytes(self) -> int:
        """Budget left: `budget - used` (negative when the process is over budget)."""
        return self.budget_bytes - self.used_bytes

    @property
    def predicted_total_bytes(self) -> int:
        """Everything the plan expected to need: weights + KV cache + overhead."""
        return self.predicted_weights_bytes + self.predicted_kv_cache_bytes + self.predicted_overhead_bytes

    @property
    def weights_prediction_error_bytes(self) -> int:
        """Measured minus predicted weight bytes (positive: the plan under-estimated)."""
        return self.weights_bytes - self.predicted_weights_bytes


class DeviceMemoryLike(Protocol):
    """The fields of `quant.budget.DeviceMemory` the ledger reads."""

    @property
    def total_bytes(self) -> int: ...
    @property
    def used_bytes(self) -> int: ...
    @property
    def torch_allocated_bytes(self) -> int | None: ...
    @property
    def torch_reserved_bytes(self) -> int | None: ...
    @property
    def torch_peak_bytes(self) -> int | None: ...


class DeviceShareLike(Protocol):
    """The fields of `quant.placement.DeviceShare` the ledger reads: one device's part of the plan."""

    @property
    def device(self) -> str: ...
    @property
    def budget_bytes(self) -> int: ...
    @property
    def weights_bytes(self) -> int: ...
    @property
    def overhead_bytes(self) -> int: ...
    @property
    def kv_cache_bytes(self) -> int: ...


class PlanLike(Protocol):
    """The fields of `quant.plan.Plan` the ledger reads."""

    @property
    def budget_bytes(self) -> int: ...
    @property
    def weights_bytes(self) -> int: ...
    @property
    def kv_cache_bytes(self) -> int: ...
    @property
    def overhead_bytes(self) -> int: ...
    @property
    def device_split(self) -> Sequence[DeviceShareLike]: ...


class LoadReportLike(Protocol):
    """The fields of `quant.load.LoadReport` the ledger reads."""

    @property
    def measured_weights_bytes(self) -> int: ...
    @property
    def measured_weights_by_device(self) -> Mapping[str, int]: ...


def build_ledger(device: str, plan: PlanLike, load_report: LoadReportLike, memory: DeviceMemoryLike) -> MemoryLedger:
    """Combine the plan (its share for `device` when the plan spreads over several), the load report and one
    device-memory reading into a ledger."""
    share = next((s for s in plan.device_split if s.device == device), None) if len(plan.device_split) > 1 else None
    if share is None:
        budget, weights, overhead = plan.budget_bytes, plan.weights_bytes, plan.overhead_bytes
        kv_cache = plan.kv_cache_bytes
        measured = load_report.measured_weights_bytes
    else:
        budget, weights, overhead = share.budget_bytes, share.weights_bytes, share.overhead_bytes
        kv_cache = share.kv_cache_bytes
        measured = load_report.measured_weights_by_device.get(device, 0)
    return MemoryLedger(
        device=device,
        budget_bytes=int(budget),
        total_bytes=int(memory.total_bytes),
        used_bytes=int(memory.used_bytes),
        weights_bytes=int(measured),
        predicted_weights_bytes=int(weights),
        predicted_kv_cache_bytes=int(kv_cache),
        predicted_overhead_bytes=int(overhead),
        torch_allocated_bytes=_optional_int(memory.torch_allocated_bytes),
        torch_reserved_bytes=_optional_int(memory.torch_reserved_bytes),
        torch_peak_bytes=_optional_int(memory.torch_peak_bytes),
    )


def ledger_devices(plan: PlanLike, device: str) -> tuple[str, ...]:
    """The devices with a ledger: each device of the plan's split when it has several, else `device`."""
    if len(plan.device_split) > 1:
        return tuple(share.device for share in plan.device_split)
    return (device,)


def make_ledger_fn(
    plan: PlanLike,
    load_report: LoadReportLike,
    device: str,
    *,
    read_memory: Callable[[str], DeviceMemoryLike] | None = None,
) -> Callable[[], tuple[MemoryLedger, ...]]:
    """A function that returns fresh `MemoryLedger`s, one per device, each call (the metrics collector calls it
    per scrape). `device` is the plan's device ("cpu", "cuda:0"; for several GPUs the split names them).

    `read_memory` defaults to `quant.budget.read_device_memory`; tests pass a fake.
    """
    reader: Callable[[str], DeviceMemoryLike]
    if read_memory is None:
        from fitserve.quant.budget import read_device_memory

        reader = read_device_memory
    else:
        reader = read_memory
    devices = ledger_devices(plan, device)

    def ledgers() -> tuple[MemoryLedger, ...]:
        return tuple(build_ledger(name, plan, load_report, reader(name)) for name in devices)

    return ledgers


def _optional_int(value: int | None) -> int | None:
    return None if value is None else int(value)
