"""Prometheus metrics: engine stats dataclasses in, exposition text out.

The only module that imports prometheus_client. Two kinds of series:

* event series (counters, histograms) updated by `record_step` / `record_request`, which the engine thread
  calls as the `StatsSink`;
* state series (gauges, plus the engine's OOM / preemption totals) built at scrape time by a custom
  collector from an `EngineSnapshot` and a `MemoryLedger`. No background thread: a scrape only calls the two
  cheap callables it was given.

Every metric fitserve exports is declared once in `METRICS`; `exposed_sample_names()` derives the sample
names a PromQL query may use from that table (the dashboard test checks its queries against it).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fitserve.server.engine.types import EngineSnapshot, RequestStats, RequestStatus, StepStats
from fitserve.server.ledger import MemoryLedger, ModelInfo

logger = logging.getLogger(__name__)

LedgerReading = MemoryLedger | tuple[MemoryLedger, ...]  # one device, or one ledger per device


class MetricKind(enum.Enum):
    """Prometheus metric types fitserve uses."""

    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family: its full name (counters include `_total`), type, help text and labels."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()


# Buckets span CPU (seconds per token) and GPU (milliseconds per token) serving.
TTFT_BUCKETS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
ITL_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
REQUEST_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    45.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
QUEUE_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
STEP_DURATION_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.32,
    0.64,
    1.28,
    2.56,
    5.12,
    10.24,
)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

_DEVICE = ("device",)

# Memory ledger (collected at scrape time from the ledger function).
MEMORY_BUDGET = MetricSpec(
    "fitserve_memory_budget_bytes", MetricKind.GAUGE, "Memory budget the plan was made for.", _DEVICE
)
DEVICE_TOTAL = MetricSpec(
    "fitserve_device_memory_total_bytes", MetricKind.GAUGE, "Total memory of the device (CPU: physical RAM).", _DEVICE
)
DEVICE_USED = MetricSpec(
    "fitserve_device_memory_used_bytes",
    MetricKind.GAUGE,
    "Device memory in use (CUDA: used per NVML/mem_get_info, all processes; CPU: this process's RSS).",
    _DEVICE,
)
TORCH_ALLOCATED = MetricSpec(
    "fitserve_torch_memory_allocated_bytes",
    MetricKind.GAUGE,
    "Bytes held by live tensors in torch's caching allocator (CUDA only; absent on CPU).",
    _DEVICE,
)
TORCH_RESERVED = MetricSpec(
    "fitserve_torch_memory_reserved_bytes",
    MetricKind.GAUGE,
    "Bytes reserved by torch's caching allocator (CUDA only; absent on CPU).",
    _DEVICE,
)
TORCH_PEAK = MetricSpec(
    "fitserve_torch_memory_peak_bytes",
    MetricKind.GAUGE,
    "Peak bytes allocated by torch since start or the last peak reset (CUDA only; absent on CPU).",
    _DEVICE,
)
HEADROOM = MetricSpec(
    "fitserve_memory_headroom_bytes",
    MetricKind.GAUGE,
    "Memory budget minus device memory used (negative: over budget).",
    _DEVICE,
)
WEIGHTS = MetricSpec(
    "fitserve_model_weights_bytes", MetricKind.GAUGE, "Model weight bytes measured after loading.", _DEVICE
)
PLAN_PREDICTED = MetricSpec(
    "fitserve_plan_predicted_bytes",
    MetricKind.GAUGE,
    "Bytes the plan predicted per component (weights, kv_cache, overhead).",
    ("device", "component"),
)
MODEL_INFO = MetricSpec(
    "fitserve_model_info",
    MetricKind.GAUGE,
    "Always 1; labels describe the served model, its precision and device.",
    ("model", "precision", "quant_method", "dtype", "device"),
)
# Engine state (collected at scrape time from the engine snapshot).
KV_CAPACITY = MetricSpec("fitserve_kv_cache_capacity_tokens", MetricKind.GAUGE, "KV cache capacity in tokens.")
KV_USED = MetricSpec("fitserve_kv_cache_used_tokens", MetricKind.GAUGE, "Tokens currently written to the KV cache.")
KV_RESERVED = MetricSpec(
    "fitserve_kv_cache_reserved_tokens",
    MetricKind.GAUGE,
    "KV cache tokens reserved by admitted requests (prompt + max_tokens).",
)
KV_USAGE = MetricSpec("fitserve_kv_cache_usage_ratio", MetricKind.GAUGE, "Used KV cache tokens over capacity (0 to 1).")
RUNNING = MetricSpec("fitserve_requests_running", MetricKind.GAUGE, "Requests currently in the running batch.")
WAITING = MetricSpec("fitserve_requests_waiting", MetricKind.GAUGE, "Requests waiting to be scheduled.")
CURRENT_MAX_BATCH_SIZE = MetricSpec(
    "fitserve_engine_current_max_batch_size",
    MetricKind.GAUGE,
    "Current cap on running sequences: --max-batch-size, lowered for a while after an OOM.",
)
OOM_EVENTS = MetricSpec(
    "fitserve_oom_events_total", MetricKind.COUNTER, "Out-of-memory errors the engine caught while running a step."
)
PREEMPTIONS = MetricSpec(
    "fitserve_preemptions_total", MetricKind.COUNTER, "Running requests preempted back to the waiting queue."
)
PREFIX_QUERIES = MetricSpec(
    "fitserve_prefix_cache_queries_total",
    MetricKind.COUNTER,
    "Prompt tokens looked up in the prefix cache when requests were admitted.",
)
PREFIX_HITS = MetricSpec(
    "fitserve_prefix_cache_hits_total",
    MetricKind.COUNTER,
    "Prompt tokens whose KV came from cached blocks instead of being computed.",
)
# Events (recorded from StepStats / RequestStats).
BATCH_SIZE = MetricSpec("fitserve_batch_size", MetricKind.HISTOGRAM, "Running sequences per engine step.")
STEP_DURATION = MetricSpec("fitserve_step_duration_seconds", MetricKind.HISTOGRAM, "Wall time of one engine step.")
REQUESTS = MetricSpec(
    "fitserve_requests_total",
    MetricKind.COUNTER,
    "Finished requests by status (ok, length, error, rejected, aborted).",
    ("status",),
)
PROMPT_TOKENS = MetricSpec(
    "fitserve_prompt_tokens_total", MetricKind.COUNTER, "Prompt tokens of admitted requests, counted when they finish."
)
GENERATION_TOKENS = MetricSpec(
    "fitserve_generation_tokens_total", MetricKind.COUNTER, "Generated tokens, counted when each request finishes."
)
TTFT = MetricSpec(
    "fitserve_time_to_first_token_seconds", MetricKind.HISTOGRAM, "Time from arrival to the first generated token."
)
ITL = MetricSpec(
    "fitserve_inter_token_latency_seconds",
    MetricKind.HISTOGRAM,
    "Time between consecutive generated tokens of a request.",
)
REQUEST_DURATION = MetricSpec(
    "fitserve_request_duration_seconds", MetricKind.HISTOGRAM, "Time from arrival to the end of a request."
)
REQUEST_QUEUE = MetricSpec(
    "fitserve_request_queue_seconds", MetricKind.HISTOGRAM, "Time from arrival to first being scheduled."
)

METRICS: tuple[MetricSpec, ...] = (
    MEMORY_BUDGET,
    DEVICE_TOTAL,
    DEVICE_USED,
    TORCH_ALLOCATED,
    TORCH_RESERVED,
    TORCH_PEAK,
    HEADROOM,
    WEIGHTS,
    PLAN_PREDICTED,
    MODEL_INFO,
    KV_CAPACITY,
    KV_USED,
    KV_RESERVED,
    KV_USAGE,
    RUNNING,
    WAITING,
    CURRENT_MAX_BATCH_SIZE,
    OOM_EVENTS,
    PREEMPTIONS,
    PREFIX_QUERIES,
    PREFIX_HITS,
    BATCH_SIZE,
    STEP_DURATION,
    REQUESTS,
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    TTFT,
    ITL,
    REQUEST_DURATION,
    REQUEST_QUEUE,
)


def exposed_sample_names() -> frozenset[str]:
    """Every sample name a PromQL query may select from fitserve's exposition.

    Gauges: the name. Counters: `<name>` (ending in `_total`) and `<base>_created`. Histograms: `_bucket`,
    `_sum`, `_count` and `_created`; a histogram's bare name is not a series.
    """
    names: set[str] = set()
    for spec in METRICS:
        if spec.kind is MetricKind.GAUGE:
            names.add(spec.name)
        elif spec.kind is MetricKind.COUNTER:
            names.update({spec.name, spec.name.removesuffix("_total") + "_created"})
        else:
            names.update(spec.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
    return frozenset(names)


def _gauge(spec: MetricSpec) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)


def _counter(spec: MetricSpec) -> CounterMetricFamily:
    return CounterMetricFamily(spec.name, spec.help, labels=spec.labels)


def _add_ledger(ledger: MemoryLedger, families: dict[str, GaugeMetricFamily], predicted: GaugeMetricFamily) -> None:
    """Add one device's ledger readings to the gauge families (labelled with its device)."""
    device = [ledger.device]
    values: dict[MetricSpec, int | None] = {
        MEMORY_BUDGET: ledger.budget_bytes,
        DEVICE_TOTAL: ledger.total_bytes,
        DEVICE_USED: ledger.used_bytes,
        TORCH_ALLOCATED: ledger.torch_allocated_bytes,
        TORCH_RESERVED: ledger.torch_reserved_bytes,
        TORCH_PEAK: ledger.torch_peak_bytes,
        HEADROOM: ledger.headroom_bytes,
        WEIGHTS: ledger.weights_bytes,
    }
    for spec, value in values.items():
        if value is not None:  # None (torch stats on CPU): no sample at all, never a fake zero
            families[spec.name].add_metric(device, value)
    predicted.add_metric([ledger.device, "weights"], ledger.predicted_weights_bytes)
    predicted.add_metric([ledger.device, "kv_cache"], ledger.predicted_kv_cache_bytes)
    predicted.add_metric([ledger.device, "overhead"], ledger.predicted_overhead_bytes)


class _StateCollector(Collector):
    """Builds the gauges (and engine totals) from the snapshot and ledger callables at scrape time."""

    def __init__(self) -> None:
        self.snapshot_fn: Callable[[], EngineSnapshot] | None = None
        self.ledger_fn: Callable[[], LedgerReading] | None = None
        self.model_info: ModelInfo | None = None

    def describe(self) -> list[Metric]:
        """Declare the families so the registry can detect name clashes without calling the callables."""
        return [*self._ledger_families(None), *self._snapshot_families(None), self._model_info_family()]

    def collect(self) -> Iterator[Metric]:
        """One scrape: read the ledger and the snapshot once each; a failing callable only drops its series."""
        yield from self._ledger_families(self._call(self.ledger_fn, "memory ledger"))
        yield from self._snapshot_families(self._call(self.snapshot_fn, "engine snapshot"))
        yield self._model_info_family()

    @staticmethod
    def _call(fn: Callable[[], object] | None, what: str) -> object | None:
        if fn is None:
            return None
        try:
            return fn()
        except Exception:  # a scrape must never fail because one source did
            logger.warning("reading the %s for /metrics failed", what, exc_info=True)
            return None

    def _model_info_family(self) -> GaugeMetricFamily:
        family = _gauge(MODEL_INFO)
        info = self.model_info
        if info is not None:
            family.add_metric([info.model, info.precision, info.quant_method, info.dtype, info.device], 1)
        return family

    @staticmethod
    def _ledger_families(ledger: object | None) -> list[Metric]:
        specs = (
            MEMORY_BUDGET,
            DEVICE_TOTAL,
            DEVICE_USED,
            TORCH_ALLOCATED,
            TORCH_RESERVED,
            TORCH_PEAK,
            HEADROOM,
            WEIGHTS,
        )
        families = {spec.name: _gauge(spec) for spec in specs}
        predicted = _gauge(PLAN_PREDICTED)
        readings = (ledger,) if isinstance(ledger, MemoryLedger) else ledger if isinstance(ledger, tuple) else ()
        for reading in readings:  # one per device: the `device` label tells them apart
            if isinstance(reading, MemoryLedger):
                _add_ledger(reading, families, predicted)
        return [*families.values(), predicted]

    @staticmethod
    def _snapshot_families(snapshot: object | None) -> list[Metric]:
        gauges = {
            spec: _gauge(spec)
            for spec in (KV_CAPACITY, KV_USED, KV_RESERVED, KV_USAGE, RUNNING, WAITING, CURRENT_MAX_BATCH_SIZE)
        }
        counters = {spec: _counter(spec) for spec in (OOM_EVENTS, PREEMPTIONS, PREFIX_QUERIES, PREFIX_HITS)}
        if isinstance(snapshot, EngineSnapshot):
            capacity = snapshot.kv_capacity_tokens
            gauges[KV_CAPACITY].add_metric([], capacity)
            gauges[KV_USED].add_metric([], snapshot.kv_used_tokens)
            gauges[KV_RESERVED].add_metric([], snapshot.kv_reserved_tokens)
            gauges[KV_USAGE].add_metric([], snapshot.kv_used_tokens / capacity if capacity > 0 else 0.0)
            gauges[RUNNING].add_metric([], snapshot.running)
            gauges[WAITING].add_metric([], snapshot.waiting)
            gauges[CURRENT_MAX_BATCH_SIZE].add_metric([], snapshot.current_max_batch_size)
            counters[OOM_EVENTS].add_metric([], snapshot.oom_events_total)
            counters[PREEMPTIONS].add_metric([], snapshot.preemptions_total)
            counters[PREFIX_QUERIES].add_metric([], snapshot.prefix_cache_queries_total)
            counters[PREFIX_HITS].add_metric([], snapshot.prefix_cache_hits_total)
        return [*gauges.values(), *counters.values()]


class ServerMetrics:
    """fitserve's Prometheus metrics; the engine's `StatsSink`.

    `registry` defaults to a fresh `CollectorRegistry` (not the process-global one), so several apps (tests)
    can each own one. `render()` is what `GET /metrics` returns.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        model_info: ModelInfo | None = None,
        ledger_fn: Callable[[], LedgerReading] | None = None,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._state = _StateCollector()
        self._state.model_info = model_info
        self._state.ledger_fn = ledger_fn
        self.registry.register(self._state)

        def histogram(spec: MetricSpec, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(spec.name, spec.help, spec.labels, registry=self.registry, buckets=buckets)

        def counter(spec: MetricSpec) -> Counter:
            return Counter(spec.name, spec.help, spec.labels, registry=self.registry)

        self._batch_size = histogram(BATCH_SIZE, BATCH_SIZE_BUCKETS)
        self._step_duration = histogram(STEP_DURATION, STEP_DURATION_BUCKETS_S)
        self._ttft = histogram(TTFT, TTFT_BUCKETS_S)
        self._itl = histogram(ITL, ITL_BUCKETS_S)
        self._duration = histogram(REQUEST_DURATION, REQUEST_DURATION_BUCKETS_S)
        self._queue = histogram(REQUEST_QUEUE, QUEUE_BUCKETS_S)
        self._requests = counter(REQUESTS)
        self._prompt_tokens = counter(PROMPT_TOKENS)
        self._generation_tokens = counter(GENERATION_TOKENS)
        for status in RequestStatus:  # every status exported from the start, at 0
            self._requests.labels(status=status.value)

    def attach_snapshot(self, snapshot_fn: Callable[[], EngineSnapshot]) -> None:
        """Read engine gauges from `snapshot_fn` at each scrape (the engine is built after the metrics)."""
        self._state.snapshot_fn = snapshot_fn

    def attach_ledger(self, ledger_fn: Callable[[], LedgerReading]) -> None:
        """Read the memory ledger from `ledger_fn` at each scrape (when the model loads after construction)."""
        self._state.ledger_fn = ledger_fn

    def set_model_info(self, model_info: ModelInfo) -> None:
        """Set the labels of `fitserve_model_info` (when the model loads after construction)."""
        self._state.model_info = model_info

    def record_step(self, stats: StepStats) -> None:
        """Observe one engine step. Never raises (called from the engine thread)."""
        try:
            self._batch_size.observe(stats.batch_size)
            self._step_duration.observe(stats.step_duration_s)
        except Exception:
            logger.warning("recording step stats failed", exc_info=True)

    def record_request(self, stats: RequestStats) -> None:
        """Count one finished, rejected, aborted or failed request and observe its latencies. Never raises."""
        try:
            status = RequestStatus(stats.status)
            self._requests.labels(status=status.value).inc()
            if status is not RequestStatus.REJECTED:  # a rejected prompt was never processed
                self._prompt_tokens.inc(stats.prompt_tokens)
            self._generation_tokens.inc(stats.generation_tokens)
            if stats.queue_s is not None:
                self._queue.observe(stats.queue_s)
            if stats.ttft_s is not None:
                self._ttft.observe(stats.ttft_s)
            if stats.e2e_s is not None:
                self._duration.observe(stats.e2e_s)
            for latency_s in stats.inter_token_latencies_s:
                self._itl.observe(latency_s)
        except Exception:
            logger.warning("recording request stats failed", exc_info=True)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4
