"""Detect the memory budget: how many bytes the model, its KV cache and the runtime may use.

CPU: `--memory-budget` when given, otherwise psutil's available memory capped by a cgroup limit, minus a
reserve. CUDA: per visible device, free memory (NVML when `nvidia-ml-py` is importable and device indices
are unambiguous, else `torch.cuda.mem_get_info`) minus a reserve; several GPUs add up. The reserve is the
larger of 5% of total memory and 512 MiB. A user budget always wins.

Everything that touches the machine goes through a `MemoryProbe`, so the arithmetic is unit-tested with
fake devices.
"""

from __future__ import annotations

import enum
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_RESERVE_FRACTION = 0.05
DEFAULT_RESERVE_MIN_BYTES = 512 * MIB

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


class BudgetError(ValueError):
    """A memory size or device that cannot be understood."""


def parse_size(text: str | int) -> int:
    """Parse a memory size: `24GiB`, `24GB`, `512MiB`, `0.5GiB`, `8G` (binary), or plain bytes.

    Units are case-insensitive; `KB/MB/GB/TB` are decimal, `KiB/MiB/GiB/TiB` and bare `K/M/G/T` binary.
    Raises BudgetError for anything else, or for a size that is not positive.
    """
    if isinstance(text, bool):
        raise BudgetError(f"invalid memory size {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise BudgetError(f"memory size must be positive, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise BudgetError(
            f"invalid memory size {text!r}: use a number with an optional unit, e.g. 24GiB, 24GB, 512MiB, "
            f"0.5GiB or plain bytes"
        )
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"memory size must be positive, got {text!r}")
    return value


def format_bytes(n_bytes: int | float) -> str:
    """Human form with binary units, e.g. `256.6 MiB`."""
    value = float(n_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    return f"{sign}{value:.1f} GiB"  # pragma: no cover


def reserve_bytes(
    total_bytes: int, fraction: float = DEFAULT_RESERVE_FRACTION, min_bytes: int = DEFAULT_RESERVE_MIN_BYTES
) -> int:
    """The reserve kept back from a device: max(fraction x total, min_bytes)."""
    return max(int(total_bytes * fraction), min_bytes)


class BudgetSource(enum.StrEnum):
    """Where a device's budget figure came from."""

    USER = "user"  # --memory-budget
    PSUTIL = "psutil"  # available RAM
    CGROUP = "cgroup"  # available RAM, capped by the cgroup limit
    NVML = "nvml"
    CUDA = "cuda"  # torch.cuda.mem_get_info


@dataclass(frozen=True)
class DeviceBudget:
    """One device's share of the budget."""

    device: str  # "cpu" or "cuda:N"
    total_bytes: int
    free_bytes: int
    reserve_bytes: int
    budget_bytes: int
    source: BudgetSource
    name: str = ""


@dataclass(frozen=True)
class Budget:
    """The memory the plan may spend, over one or more devices."""

    devices: tuple[DeviceBudget, ...]
    user_specified: bool = False

    @property
    def budget_bytes(self) -> int:
        """Total over devices."""
        return sum(d.budget_bytes for d in self.devices)

    @property
    def device(self) -> str:
        """ "cpu", "cuda:0" for one GPU, "cuda" for several."""
        if len(self.devices) == 1:
            return self.devices[0].device
        return "cuda"

    @property
    def is_cuda(self) -> bool:
        """True when the budget is on GPU(s)."""
        return self.devices[0].device.startswith("cuda")

    def max_memory(self) -> dict[int | str, int]:
        """Per-device budget, keyed like accelerate's `max_memory` (GPU index or "cpu")."""
        return {_device_key(d.device): d.budget_bytes for d in self.devices}


def _device_key(device: str) -> int | str:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else device


@dataclass(frozen=True)
class DeviceMemory:
    """A reading of one device's memory, for logs and `/metrics`."""

    total_bytes: int
    used_bytes: int  # CUDA: total - free (all processes); CPU: this process's RSS
    torch_allocated_bytes: int | None = None
    torch_reserved_bytes: int | None = None
    torch_peak_bytes: int | None = None


class MemoryProbe(Protocol):
    """What the budget and the planner need to know about the machine (faked in tests)."""

    def cuda_device_count(self) -> int: ...
    def cuda_mem_info(self, index: int) -> tuple[int, int, BudgetSource]: ...  # (free, total, source)
    def cuda_name(self, index: int) -> str: ...
    def cuda_bf16_supported(self, index: int) -> bool: ...
    def cpu_memory(self) -> tuple[int, int]: ...  # (available, total)
    def cgroup_memory(self) -> tuple[int, int] | None: ...  # (limit, current usage) when a limit applies
    def cpu_native_bf16(self) -> bool: ...  # AVX512-BF16 or AMX: bf16 matmuls run at native speed
    def process_rss(self) -> int: ...  # this process's resident memory now


@dataclass
class SystemProbe:
    """The real machine: psutil, cgroup files, torch.cuda, NVML."""

    cgroup_root: Path = field(default_factory=lambda: Path("/sys/fs/cgroup"))

    def cuda_device_count(self) -> int:
        if not nvidia_driver_present():
            return 0  # no driver: no GPU, and no need to pay for importing torch
        try:
            import torch
        except ImportError:  # pragma: no cover
            return 0
        return torch.cuda.device_count() if torch.cuda.is_available() else 0

    def cuda_mem_info(self, index: int) -> tuple[int, int, BudgetSource]:
        nvml = _nvml_mem_info(index)
        if nvml is not None:
            return nvml[0], nvml[1], BudgetSource.NVML
        import torch

        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total), BudgetSource.CUDA

    def cuda_name(self, index: int) -> str:
        import torch

        return str(torch.cuda.get_device_name(index))

    def cuda_bf16_supported(self, index: int) -> bool:
        import torch

        major, _minor = torch.cuda.get_device_capability(index)
        return major >= 8  # Ampere and newer

    def cpu_native_bf16(self) -> bool:
        return bool(read_cpu_flags() & {"avx512_bf16", "amx_bf16"})

    def cpu_memory(self) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def cgroup_memory(self) -> tuple[int, int] | None:
        return read_cgroup_memory(self.cgroup_root)

    def process_rss(self) -> int:
        return process_rss_bytes()


def process_rss_bytes() -> int:
    """This process's resident set size (RSS) in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def read_cgroup_memory(root: Path) -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup, v2 or v1; None when no limit applies."""
    candidates = [
        (root / "memory.max", root / "memory.current"),  # v2
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),  # v1
    ]
    for limit_file, usage_file in candidates:
        try:
            raw = limit_file.read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit():
            return None
        limit = int(raw)
        if limit >= 1 << 60:  # v1 writes a huge number for "no limit"
            return None
        try:
            usage = int(usage_file.read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return limit, usage
    return None


def nvidia_driver_present() -> bool:
    """True when an NVIDIA kernel driver is loaded (cheap check before importing torch.cuda)."""
    return Path("/proc/driver/nvidia/version").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def read_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU feature flags (x86 Linux); empty when unknown."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _nvml_mem_info(index: int) -> tuple[int, int] | None:
    """NVML free/total for device `index`, or None when NVML is absent or indices may not match torch's.

    Total is NVML's v2 figure less what the driver reserves, which is what `cudaMemGetInfo` calls total (on an
    H200 the v1 total was 615 MiB larger than torch's). Drivers without the v2 call fall back to v1.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES"):  # NVML numbers all GPUs; torch only the visible ones
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
                return int(info.free), int(info.total - info.reserved)
            except (pynvml.NVMLError, AttributeError):  # pragma: no cover - old driver or old nvidia-ml-py
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
                return int(info.free), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as error:  # pragma: no cover - depends on the driver
        logger.debug("NVML failed (%s); falling back to torch.cuda.mem_get_info", error)
        return None


def _cuda_indices(device: str, count: int) -> list[int]:
    if device == "cuda":
        if count == 0:
            raise BudgetError("device 'cuda' asked for, but no CUDA device is available")
        return list(range(count))
    match = re.fullmatch(r"cuda:(\d+)", device)
    if not match:
        raise BudgetError(f"unknown device {device!r}: use cpu, cuda (all GPUs) or cuda:N")
    index = int(match.group(1))
    if index >= count:
        raise BudgetError(f"device {device} asked for, but only {count} CUDA device(s) are visible")
    return [index]


def detect_budget(
    device: str | None = None,
    memory_budget_bytes: int | None = None,
    *,
    probe: MemoryProbe | None = None,
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
    reserve_min_bytes: int = DEFAULT_RESERVE_MIN_BYTES,
) -> Budget:
    """Work out the memory budget for `device` (None: every GPU when CUDA is present, else the CPU).

    With `memory_budget_bytes` that figure is the budget (split over GPUs in proportion to their free
    memory); otherwise free memory minus the reserve, per device, never below zero.
    """
    probe = probe or SystemProbe()
    if memory_budget_bytes is not None and memory_budget_bytes <= 0:
        raise BudgetError(f"memory budget must be positive, got {memory_budget_bytes}")
    if device is None:
        count = probe.cuda_device_count()
        device = "cpu" if count == 0 else ("cuda:0" if count == 1 else "cuda")
    if device == "cpu":
        return Budget(
            (_cpu_budget(probe, memory_budget_bytes, reserve_fraction, reserve_min_bytes),),
            user_specified=memory_budget_bytes is not None,
        )
    indices = _cuda_indices(device, probe.cuda_device_count())
    devices = []
    for index in indices:
        free, total, source = probe.cuda_mem_info(index)
        reserve = reserve_bytes(total, reserve_fraction, reserve_min_bytes)
        devices.append(
            DeviceBudget(f"cuda:{index}", total, free, reserve, max(free - reserve, 0), source, probe.cuda_name(index))
        )
    if memory_budget_bytes is not None:
        devices = _split_user_budget(devices, memory_budget_bytes)
    return Budget(tuple(devices), user_specified=memory_budget_bytes is not None)


def _cpu_budget(probe: MemoryProbe, user_bytes: int | None, fraction: float, min_bytes: int) -> DeviceBudget:
    """The CPU budget is the process's whole memory. "Available" (psutil, or cgroup limit - usage) already
    excludes what this process holds, and the plan counts the process's own runtime, so it is added back:
    otherwise the runtime would be counted twice."""
    available, total = probe.cpu_memory()
    source = BudgetSource.PSUTIL
    cgroup = probe.cgroup_memory()
    if cgroup is not None:
        limit, usage = cgroup
        if limit < total or limit - usage < available:
            total = min(total, limit)
            available = min(available, max(limit - usage, 0))
            source = BudgetSource.CGROUP
    reserve = reserve_bytes(total, fraction, min_bytes)
    available = min(available + probe.process_rss(), total)
    if user_bytes is not None:
        if user_bytes > available:
            logger.warning(
                "memory budget %s is more than the %s available now", format_bytes(user_bytes), format_bytes(available)
            )
        return DeviceBudget("cpu", total, available, 0, user_bytes, BudgetSource.USER, "cpu")
    return DeviceBudget("cpu", total, available, reserve, max(available - reserve, 0), source, "cpu")


def _split_user_budget(devices: list[DeviceBudget], user_bytes: int) -> list[DeviceBudget]:
    """Spread a user budget over GPUs in proportion to their free memory (each capped at its free memory)."""
    free_total = sum(d.free_bytes for d in devices) or 1
    shares = [user_bytes * d.free_bytes // free_total for d in devices]
    shares[-1] += user_bytes - sum(shares)  # rounding remainder
    out = []
    for dev, share in zip(devices, shares, strict=True):
        if share > dev.free_bytes:
            logger.warning(
                "memory budget share %s for %s is more than its free %s",
                format_bytes(share),
                dev.device,
                format_bytes(dev.free_bytes),
            )
        out.append(DeviceBudget(dev.device, dev.total_bytes, dev.free_bytes, 0, share, BudgetSource.USER, dev.name))
    return out


def read_device_memory(device: str) -> DeviceMemory:
    """Read one device's memory now: CUDA free/total (+ torch allocator figures); CPU: total RAM and our RSS.

    `device` is "cpu", "cuda:N", or "cuda" (figures summed over all visible GPUs).
    """
    if device == "cpu":
        import psutil

        return DeviceMemory(
            total_bytes=int(psutil.virtual_memory().total), used_bytes=int(psutil.Process().memory_info().rss)
        )
    import torch

    indices = _cuda_indices(device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    total = used = allocated = reserved = peak = 0
    for index in indices:
        free_i, total_i = torch.cuda.mem_get_info(index)
        total += int(total_i)
        used += int(total_i - free_i)
        allocated += int(torch.cuda.memory_allocated(index))
        reserved += int(torch.cuda.memory_reserved(index))
        peak += int(torch.cuda.max_memory_allocated(index))
    return DeviceMemory(total, used, allocated, reserved, peak)
