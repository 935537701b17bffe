"""ServerMetrics on a fresh CollectorRegistry: every metric of the issue, HELP text, histograms, scrape-time gauges."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fitserve.server.engine.types import EngineSnapshot, RequestStats, RequestStatus, StepStats
from fitserve.server.ledger import MemoryLedger, ModelInfo
from fitserve.server.metrics import (
    METRICS,
    TTFT_BUCKETS_S,
    MetricKind,
    ServerMetrics,
    exposed_sample_names,
)

# The issue's metric list is the contract: these exact names must be exported.
ISSUE_METRICS = (
    "fitserve_memory_budget_bytes",
    "fitserve_device_memory_total_bytes",
    "fitserve_device_memory_used_bytes",
    "fitserve_torch_memory_allocated_bytes",
    "fitserve_torch_memory_reserved_bytes",
    "fitserve_torch_memory_peak_bytes",
    "fitserve_memory_headroom_bytes",
    "fitserve_model_weights_bytes",
    "fitserve_plan_predicted_bytes",
    "fitserve_kv_cache_capacity_tokens",
    "fitserve_kv_cache_used_tokens",
    "fitserve_kv_cache_reserved_tokens",
    "fitserve_kv_cache_usage_ratio",
    "fitserve_model_info",
    "fitserve_requests_running",
    "fitserve_requests_waiting",
    "fitserve_batch_size",
    "fitserve_requests_total",
    "fitserve_prompt_tokens_total",
    "fitserve_generation_tokens_total",
    "fitserve_oom_events_total",
    "fitserve_preemptions_total",
    "fitserve_prefix_cache_queries_total",
    "fitserve_prefix_cache_hits_total",
    "fitserve_time_to_first_token_seconds",
    "fitserve_inter_token_latency_seconds",
    "fitserve_request_duration_seconds",
    "fitserve_request_queue_seconds",
)
TORCH_ONLY = {
    "fitserve_torch_memory_allocated_bytes",
    "fitserve_torch_memory_reserved_bytes",
    "fitserve_torch_memory_peak_bytes",
}
GiB = 2**30


def cpu_ledger(used_bytes: int = 3 * GiB) -> MemoryLedger:
    return MemoryLedger(
        device="cpu",
        budget_bytes=8 * GiB,
        total_bytes=24 * GiB,
        used_bytes=used_bytes,
        weights_bytes=269_060_672,
        predicted_weights_bytes=270_000_000,
        predicted_kv_cache_bytes=92_160 * 4096,
        predicted_overhead_bytes=512 * 2**20,
    )


def cuda_ledger() -> MemoryLedger:
    return MemoryLedger(
        device="cuda:0",
        budget_bytes=70 * GiB,
        total_bytes=80 * GiB,
        used_bytes=5 * GiB,
        weights_bytes=GiB,
        predicted_weights_bytes=GiB,
        predicted_kv_cache_bytes=2 * GiB,
        predicted_overhead_bytes=GiB,
        torch_allocated_bytes=3 * GiB,
        torch_reserved_bytes=4 * GiB,
        torch_peak_bytes=int(3.5 * GiB),
    )


SNAPSHOT = EngineSnapshot(
    running=3,
    waiting=2,
    kv_capacity_tokens=4096,
    kv_used_tokens=1024,
    kv_reserved_tokens=2048,
    current_max_batch_size=16,
    oom_events_total=1,
    preemptions_total=4,
    prefix_cache_queries_total=900,
    prefix_cache_hits_total=320,
)
MODEL_INFO = ModelInfo("smollm2-135m-instruct", "bf16", "none", "bfloat16", "cpu")


def scrape(metrics: ServerMetrics) -> dict[str, object]:
    """Parse the exposition into {family name as exposed: family}; counters get their `_total` back."""
    body, _ = metrics.render()
    families = {}
    for family in text_string_to_metric_families(body.decode()):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family
    return families


def sample_value(families: dict[str, object], name: str, sample: str | None = None, **labels: str) -> float:
    family = families[name]
    wanted = sample or name
    values = [
        s.value for s in family.samples if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, (name, wanted, labels, family.samples)
    return values[0]


def fed_metrics(ledger: MemoryLedger) -> ServerMetrics:
    metrics = ServerMetrics(CollectorRegistry(), model_info=MODEL_INFO, ledger_fn=lambda: ledger)
    metrics.attach_snapshot(lambda: SNAPSHOT)
    metrics.record_step(StepStats(batch_size=3, prefill_tokens=12, decode_tokens=2, step_duration_s=0.04))
    metrics.record_request(
        RequestStats("ok", 12, 5, queue_s=0.01, ttft_s=0.2, e2e_s=1.0, inter_token_latencies_s=(0.1,) * 4)
    )
    return metrics


def test_every_issue_metric_is_exported_with_help_and_declared() -> None:
    families = scrape(fed_metrics(cpu_ledger()))
    declared = {spec.name for spec in METRICS}
    for name in ISSUE_METRICS:
        assert name in declared
        assert name in families, name
        assert families[name].documentation.strip(), f"{name} has no HELP text"
    for spec in METRICS:  # extras too
        assert families[spec.name].documentation == spec.help
        assert families[spec.name].type == spec.kind.value


def test_cpu_has_no_torch_samples_but_every_other_metric_has_one() -> None:
    families = scrape(fed_metrics(cpu_ledger()))
    for spec in METRICS:
        samples = families[spec.name].samples
        if spec.name in TORCH_ONLY:
            assert samples == [], f"{spec.name} must be absent on CPU, not zero"
        else:
            assert samples, f"{spec.name} has no sample"
    body, _ = fed_metrics(cpu_ledger()).render()
    assert "\nfitserve_torch_memory_peak_bytes{" not in body.decode()


def test_cuda_ledger_exports_torch_allocator_stats() -> None:
    families = scrape(fed_metrics(cuda_ledger()))
    assert sample_value(families, "fitserve_torch_memory_allocated_bytes", device="cuda:0") == 3 * GiB
    assert sample_value(families, "fitserve_torch_memory_reserved_bytes", device="cuda:0") == 4 * GiB
    assert sample_value(families, "fitserve_torch_memory_peak_bytes", device="cuda:0") == int(3.5 * GiB)


def test_ledger_gauges_carry_device_and_exact_values() -> None:
    ledger = cpu_ledger()
    families = scrape(fed_metrics(ledger))
    assert sample_value(families, "fitserve_memory_budget_bytes", device="cpu") == 8 * GiB
    assert sample_value(families, "fitserve_device_memory_total_bytes", device="cpu") == 24 * GiB
    assert sample_value(families, "fitserve_device_memory_used_bytes", device="cpu") == 3 * GiB
    assert sample_value(families, "fitserve_memory_headroom_bytes", device="cpu") == 5 * GiB
    assert sample_value(families, "fitserve_model_weights_bytes", device="cpu") == 269_060_672
    predicted = "fitserve_plan_predicted_bytes"
    assert sample_value(families, predicted, device="cpu", component="weights") == 270_000_000
    assert sample_value(families, predicted, device="cpu", component="kv_cache") == 92_160 * 4096
    assert sample_value(families, predicted, device="cpu", component="overhead") == 512 * 2**20
    info = families["fitserve_model_info"].samples
    assert len(info) == 1 and info[0].value == 1
    assert info[0].labels == {
        "model": "smollm2-135m-instruct",
        "precision": "bf16",
        "quant_method": "none",
        "dtype": "bfloat16",
        "device": "cpu",
    }


def test_ledger_is_read_at_every_scrape() -> None:
    readings = iter([cpu_ledger(used_bytes=GiB), cpu_ledger(used_bytes=9 * GiB)])
    metrics = ServerMetrics(ledger_fn=lambda: next(readings))
    assert sample_value(scrape(metrics), "fitserve_memory_headroom_bytes", device="cpu") == 7 * GiB
    assert sample_value(scrape(metrics), "fitserve_memory_headroom_bytes", device="cpu") == -1 * GiB


def test_snapshot_gauges_and_engine_totals() -> None:
    families = scrape(fed_metrics(cpu_ledger()))
    assert sample_value(families, "fitserve_requests_running") == 3
    assert sample_value(families, "fitserve_requests_waiting") == 2
    assert sample_value(families, "fitserve_kv_cache_capacity_tokens") == 4096
    assert sample_value(families, "fitserve_kv_cache_used_tokens") == 1024
    assert sample_value(families, "fitserve_kv_cache_reserved_tokens") == 2048
    assert sample_value(families, "fitserve_kv_cache_usage_ratio") == pytest.approx(0.25)
    assert sample_value(families, "fitserve_engine_current_max_batch_size") == 16
    assert sample_value(families, "fitserve_oom_events_total") == 1
    assert sample_value(families, "fitserve_preemptions_total") == 4
    assert sample_value(families, "fitserve_prefix_cache_queries_total") == 900
    assert sample_value(families, "fitserve_prefix_cache_hits_total") == 320


def test_snapshot_is_read_at_scrape_time_and_zero_capacity_gives_zero_ratio() -> None:
    metrics = ServerMetrics()
    state = {"snapshot": SNAPSHOT}
    metrics.attach_snapshot(lambda: state["snapshot"])
    assert sample_value(scrape(metrics), "fitserve_oom_events_total") == 1
    state["snapshot"] = EngineSnapshot(0, 0, 0, 0, 0, 1, 3, 4)
    families = scrape(metrics)
    assert sample_value(families, "fitserve_oom_events_total") == 3
    assert sample_value(families, "fitserve_kv_cache_usage_ratio") == 0.0


def test_histograms_bucket_each_observation() -> None:
    metrics = ServerMetrics()
    metrics.record_request(
        RequestStats("ok", 10, 3, queue_s=0.002, ttft_s=0.03, e2e_s=0.7, inter_token_latencies_s=(0.004, 0.04))
    )
    metrics.record_request(
        RequestStats("length", 20, 16, queue_s=3.0, ttft_s=4.0, e2e_s=12.0, inter_token_latencies_s=(0.3,) * 15)
    )
    metrics.record_request(RequestStats("rejected", 9000, 0, queue_s=None, ttft_s=None, e2e_s=None))
    families = scrape(metrics)
    ttft = "fitserve_time_to_first_token_seconds"
    assert sample_value(families, ttft, ttft + "_count") == 2
    assert sample_value(families, ttft, ttft + "_sum") == pytest.approx(4.03)
    assert sample_value(families, ttft, ttft + "_bucket", le="0.025") == 0
    assert sample_value(families, ttft, ttft + "_bucket", le="0.05") == 1
    assert sample_value(families, ttft, ttft + "_bucket", le="5.0") == 2
    assert sample_value(families, ttft, ttft + "_bucket", le="+Inf") == 2
    itl = "fitserve_inter_token_latency_seconds"
    assert sample_value(families, itl, itl + "_count") == 17
    assert sample_value(families, itl, itl + "_bucket", le="0.005") == 1
    assert sample_value(families, itl, itl + "_bucket", le="0.05") == 2
    assert sample_value(families, itl, itl + "_bucket", le="0.3") == 17
    duration = "fitserve_request_duration_seconds"
    assert sample_value(families, duration, duration + "_count") == 2
    assert sample_value(families, duration, duration + "_bucket", le="1.0") == 1
    queue = "fitserve_request_queue_seconds"
    assert sample_value(families, queue, queue + "_sum") == pytest.approx(3.002)
    buckets = [s for s in families[ttft].samples if s.name == ttft + "_bucket"]
    assert len(buckets) == len(TTFT_BUCKETS_S) + 1


def test_request_counters_by_status_and_tokens() -> None:
    metrics = ServerMetrics()
    families = scrape(metrics)
    for status in ("ok", "length", "error", "rejected", "aborted"):  # present from the start, at zero
        assert sample_value(families, "fitserve_requests_total", status=status) == 0
    metrics.record_request(RequestStats(RequestStatus.OK, 10, 4, 0.0, 0.1, 0.5))
    metrics.record_request(RequestStats(RequestStatus.OK, 7, 2, 0.0, 0.1, 0.5))
    metrics.record_request(RequestStats(RequestStatus.ABORTED, 5, 1, 0.0, 0.1, 0.2))
    metrics.record_request(RequestStats(RequestStatus.REJECTED, 5000, 0, None, None, None))
    metrics.record_request(RequestStats(RequestStatus.LENGTH, 3, 2, 0.0, 0.1, 0.3))
    families = scrape(metrics)
    assert sample_value(families, "fitserve_requests_total", status="ok") == 2
    assert sample_value(families, "fitserve_requests_total", status="aborted") == 1
    assert sample_value(families, "fitserve_requests_total", status="rejected") == 1
    assert sample_value(families, "fitserve_requests_total", status="length") == 1  # enum value, not its repr
    assert sample_value(families, "fitserve_requests_total", status="error") == 0
    assert sample_value(families, "fitserve_prompt_tokens_total") == 25  # the rejected prompt was never run
    assert sample_value(families, "fitserve_generation_tokens_total") == 9


def test_batch_size_histogram_from_steps() -> None:
    metrics = ServerMetrics()
    for batch in (1, 3, 3, 40):
        metrics.record_step(StepStats(batch, 0, batch, 0.01))
    families = scrape(metrics)
    name = "fitserve_batch_size"
    assert sample_value(families, name, name + "_count") == 4
    assert sample_value(families, name, name + "_sum") == 47
    assert sample_value(families, name, name + "_bucket", le="1.0") == 1
    assert sample_value(families, name, name + "_bucket", le="4.0") == 3
    assert sample_value(families, name, name + "_bucket", le="32.0") == 3
    assert sample_value(families, name, name + "_bucket", le="64.0") == 4


def test_scrape_survives_failing_sources() -> None:
    def broken() -> EngineSnapshot:
        raise RuntimeError("NVML went away")

    metrics = ServerMetrics(ledger_fn=broken)  # type: ignore[arg-type]
    metrics.attach_snapshot(broken)
    metrics.record_request(RequestStats("ok", 3, 2, 0.0, 0.1, 0.2))
    families = scrape(metrics)
    assert families["fitserve_memory_budget_bytes"].samples == []
    assert families["fitserve_requests_running"].samples == []
    assert sample_value(families, "fitserve_generation_tokens_total") == 2


def test_before_the_model_loads_gauges_are_empty_then_attached_later() -> None:
    metrics = ServerMetrics()
    families = scrape(metrics)
    assert families["fitserve_model_info"].samples == []
    assert families["fitserve_model_weights_bytes"].samples == []
    metrics.set_model_info(MODEL_INFO)
    metrics.attach_ledger(cpu_ledger)
    families = scrape(metrics)
    assert sample_value(families, "fitserve_model_info", device="cpu") == 1
    assert sample_value(families, "fitserve_model_weights_bytes", device="cpu") == 269_060_672


def test_render_content_type_and_sample_names_match_declared_set() -> None:
    metrics = fed_metrics(cuda_ledger())
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    sample_names = {
        line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line and not line.startswith("#")
    }
    assert sample_names <= exposed_sample_names()
    histograms = [spec.name for spec in METRICS if spec.kind is MetricKind.HISTOGRAM]
    assert all(name not in exposed_sample_names() for name in histograms)  # no bare histogram series
    assert "fitserve_requests_total" in exposed_sample_names()


def test_two_instances_do_not_share_state() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.record_request(RequestStats("ok", 3, 2, 0.0, 0.1, 0.2))
    assert sample_value(scrape(first), "fitserve_generation_tokens_total") == 2
    assert sample_value(scrape(second), "fitserve_generation_tokens_total") == 0


def test_concurrent_recording_and_scraping() -> None:
    metrics = ServerMetrics()
    metrics.attach_snapshot(lambda: SNAPSHOT)

    def record() -> None:
        for _ in range(500):
            metrics.record_step(StepStats(2, 0, 2, 0.001))
            metrics.record_request(RequestStats("ok", 1, 1, 0.0, 0.01, 0.02, (0.01,)))

    threads = [threading.Thread(target=record) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(20):
        metrics.render()
    for thread in threads:
        thread.join()
    families = scrape(metrics)
    assert sample_value(families, "fitserve_generation_tokens_total") == 2000
    assert sample_value(families, "fitserve_batch_size", "fitserve_batch_size_count") == 2000


def test_ledger_per_device_carries_its_device_label() -> None:
    gpu0 = replace(cuda_ledger(), device="cuda:0", used_bytes=GiB)
    gpu1 = replace(cuda_ledger(), device="cuda:1", used_bytes=2 * GiB)
    metrics = ServerMetrics(CollectorRegistry(), model_info=MODEL_INFO, ledger_fn=lambda: (gpu0, gpu1))
    families = scrape(metrics)
    headroom = {s.labels["device"]: s.value for s in families["fitserve_memory_headroom_bytes"].samples}
    assert headroom == {"cuda:0": gpu0.headroom_bytes, "cuda:1": gpu1.headroom_bytes}
    predicted = families["fitserve_plan_predicted_bytes"].samples
    assert {(s.labels["device"], s.labels["component"]) for s in predicted} >= {
        ("cuda:0", "kv_cache"),
        ("cuda:1", "kv_cache"),
    }
