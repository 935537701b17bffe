"""A real Prometheus scrapes a live `fitserve serve` on the default model; queries go through its HTTP API.

Needs the `prometheus` binary (Debian package `prometheus`, installed by .ci/run).
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fitserve.server.metrics import METRICS
from tests.live_server import live_server
from tests.prometheus_process import start_prometheus

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
REQUESTS = 20
CPU_ABSENT = {
    "fitserve_torch_memory_allocated_bytes",
    "fitserve_torch_memory_reserved_bytes",
    "fitserve_torch_memory_peak_bytes",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5) -> object:
    """Poll until `predicate()` returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Prometheus:
    """A running Prometheus and a client for its query API."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The single value of an instant query, or None when it returns no series."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, (promql, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def fitserve_url(default_model_dir: Path) -> Iterator[str]:
    with live_server(["--model", str(default_model_dir), "--max-batch-size", "4"]) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def prometheus(fitserve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "fitserve",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [urlsplit(fitserve_url).netloc]}],
            }
        ],
    }
    url, process, log_path = start_prometheus(workdir, config)
    server = Prometheus(url, process, log_path)
    try:
        wait_for(
            lambda: process.poll() is None and httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200,
            60,
            "Prometheus to be ready",
        )
        wait_for(lambda: server.scalar('up{job="fitserve"}') == 1, 30, "Prometheus to scrape fitserve")
        yield server
    except BaseException:
        print(log_path.read_text()[-4000:])
        raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scrape_families(base_url: str) -> dict[str, object]:
    """GET /metrics parsed; counters under their exposed `_total` names."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {}
    for family in text_string_to_metric_families(response.text):
        families[family.name + "_total" if family.type == "counter" else family.name] = family
    return families


def send_requests(base_url: str, count: int) -> list[dict]:
    """`count` chat completions, four at a time, so that the engine batches them."""
    model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]

    def one(index: int) -> dict:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Count from {index} to {index + 5}."}],
            "max_tokens": 8,
            "temperature": 0,
        }
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(count)))


@pytest.fixture(scope="module")
def served(fitserve_url: str, prometheus: Prometheus) -> dict[str, object]:
    """Start-up facts read before the load, then the load itself."""
    before = scrape_families(fitserve_url)
    weights = [s.value for s in before["fitserve_model_weights_bytes"].samples]
    generated_before = prometheus.scalar("fitserve_generation_tokens_total")
    responses = send_requests(fitserve_url, REQUESTS)
    return {"weights_at_start": weights, "generated_before": generated_before, "responses": responses}


def test_prometheus_sees_tokens_weights_and_ttft_quantile(prometheus: Prometheus, served: dict[str, object]) -> None:
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in served["responses"])
    assert completion_tokens > 0
    before = served["generated_before"]
    assert before is not None, "Prometheus had no fitserve_generation_tokens_total sample before the load"
    wait_for(
        lambda: (prometheus.scalar("fitserve_generation_tokens_total") or 0) >= before + completion_tokens,
        30,
        "Prometheus to see the generated tokens",
    )
    # Two more scrapes after the rise, so rate() and the 1m windows below have the new samples.
    scrapes = prometheus.scalar("count_over_time(fitserve_generation_tokens_total[1m])") or 0
    wait_for(
        lambda: (prometheus.scalar("count_over_time(fitserve_generation_tokens_total[1m])") or 0) >= scrapes + 2,
        30,
        "two more scrapes",
    )
    assert prometheus.scalar("increase(fitserve_generation_tokens_total[1m])") > 0

    (weights_at_start,) = served["weights_at_start"]
    assert weights_at_start > 0
    assert prometheus.scalar("fitserve_model_weights_bytes") == weights_at_start

    ttft_p50 = prometheus.scalar("histogram_quantile(0.5, rate(fitserve_time_to_first_token_seconds_bucket[1m]))")
    assert ttft_p50 is not None and math.isfinite(ttft_p50) and ttft_p50 > 0
    ok = prometheus.scalar('sum(fitserve_requests_total{status=~"ok|length"})')
    assert ok >= REQUESTS


def test_every_dashboard_query_is_valid_promql_on_real_data(prometheus: Prometheus, served: dict[str, object]) -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "fitserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    on_cuda = bool(prometheus.query('fitserve_model_info{device=~"cuda.*"}'))
    assert len(exprs) >= 20
    for expr in exprs:
        promql = (
            expr.replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$job", ".*")
            .replace("$replica", ".*")
        )
        result = prometheus.query(promql)  # asserts Prometheus accepted the expression
        if on_cuda or "fitserve_torch_memory" not in expr:  # torch allocator series are absent on CPU
            assert result, f"dashboard query returned no data: {promql}"


def test_metrics_endpoint_after_load_has_every_metric_with_help(fitserve_url: str, served: dict[str, object]) -> None:
    families = scrape_families(fitserve_url)
    info = families["fitserve_model_info"].samples
    assert len(info) == 1
    on_cuda = info[0].labels["device"].startswith("cuda")
    for spec in METRICS:
        assert spec.name in families, f"{spec.name} missing from /metrics"
        assert families[spec.name].documentation, f"{spec.name} has no HELP"
        if spec.name in CPU_ABSENT and not on_cuda:
            assert families[spec.name].samples == [], f"{spec.name} must be absent on CPU"
        else:
            assert families[spec.name].samples, f"{spec.name} has no sample"
    count = next(s.value for s in families["fitserve_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    assert count >= REQUESTS
    assert next(s.value for s in families["fitserve_kv_cache_capacity_tokens"].samples) > 0
    budget = next(s.value for s in families["fitserve_memory_budget_bytes"].samples)
    used = next(s.value for s in families["fitserve_device_memory_used_bytes"].samples)
    headroom = next(s.value for s in families["fitserve_memory_headroom_bytes"].samples)
    assert headroom == budget - used  # one ledger reading per scrape
