"""On a real CUDA device, the memory gauges equal torch's own counters read at the same moment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fitserve.server.ledger import make_ledger_fn
from fitserve.server.metrics import ServerMetrics

pytestmark = pytest.mark.gpu

MiB = 2**20


def gauge(body: bytes, name: str) -> float:
    """The single sample of gauge `name` in an exposition body."""
    for family in text_string_to_metric_families(body.decode()):
        if family.name == name:
            (sample,) = family.samples
            return sample.value
    raise AssertionError(f"{name} not exported")


def test_cuda_memory_metrics_match_torch() -> None:
    import torch

    device = "cuda:0"
    torch.cuda.init()  # reset_peak_memory_stats does not initialise CUDA itself ("Invalid device argument")
    plan = SimpleNamespace(
        budget_bytes=8 * 1024 * MiB, weights_bytes=0, kv_bytes_per_token=0, kv_capacity_tokens=0, overhead_bytes=0
    )
    metrics = ServerMetrics(ledger_fn=make_ledger_fn(plan, SimpleNamespace(measured_weights_bytes=0), device))
    torch.cuda.reset_peak_memory_stats(device)
    blocks = [torch.ones(64 * MiB, dtype=torch.uint8, device=device) for _ in range(4)]
    del blocks[1:3]  # the allocator keeps the freed blocks reserved: allocated < reserved < peak is visible
    torch.cuda.synchronize(device)

    allocated = torch.cuda.memory_allocated(device)
    reserved = torch.cuda.memory_reserved(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    body, _ = metrics.render()
    assert torch.cuda.memory_allocated(device) == allocated, "the scrape itself allocated CUDA memory"

    assert gauge(body, "fitserve_torch_memory_allocated_bytes") == allocated
    assert gauge(body, "fitserve_torch_memory_reserved_bytes") == reserved
    assert gauge(body, "fitserve_torch_memory_peak_bytes") == peak
    assert allocated < reserved and allocated < peak
    assert peak >= 4 * 64 * MiB
    assert gauge(body, "fitserve_device_memory_total_bytes") == total
    used = gauge(body, "fitserve_device_memory_used_bytes")
    assert used == pytest.approx(total - free, abs=256 * MiB)  # NVML vs mem_get_info; other processes may move it
    assert used >= reserved
    assert gauge(body, "fitserve_memory_headroom_bytes") == plan.budget_bytes - used
    del blocks
