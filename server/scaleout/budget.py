"""The memory budget of one replica on the device Ray gave it (pure arithmetic; the probe is passed in).

A replica with `num_gpus=0.5` plans inside half the device: its share of the total minus its share of the
reserve, and never more than what is free now (a neighbour may already have loaded). A CPU replica uses the
budget it was configured with (several replicas share the node's RAM), or its planner's own detection.
"""

from __future__ import annotations

from fitserve.quant.budget import reserve_bytes


def gpu_share_bytes(total_bytes: int, free_bytes: int, gpu_fraction: float) -> int:
    """Bytes a replica holding `gpu_fraction` of a device may plan for (0 < gpu_fraction <= 1)."""
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    reserve = reserve_bytes(total_bytes)
    share = int(gpu_fraction * (total_bytes - reserve))
    free_after_reserve = free_bytes - int(gpu_fraction * reserve)
    return max(min(share, free_after_reserve), 0)


def replica_memory_budget(num_gpus: float, configured_budget: str | None) -> str | None:
    """The `memory_budget` setting for a replica: its share of the GPU Ray assigned, else the configured one.

    Whole GPUs (num_gpus >= 1) and CPU replicas keep the configured budget (None: the planner detects it).
    """
    if not 0 < num_gpus < 1:
        return configured_budget
    from fitserve.quant.budget import SystemProbe

    probe = SystemProbe()
    if probe.cuda_device_count() == 0:
        return configured_budget
    free, total, _ = probe.cuda_mem_info(0)  # Ray sets CUDA_VISIBLE_DEVICES: the assigned device is index 0
    share = gpu_share_bytes(total, free, num_gpus)
    if configured_budget is not None:
        from fitserve.quant.budget import parse_size

        share = min(share, parse_size(configured_budget))
    return str(share)
