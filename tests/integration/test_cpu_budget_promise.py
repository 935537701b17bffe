"""The memory budget is a promise on CPU too: each precision served at its own minimum budget + 5%, under a
short load at the plan's batch cap, never holds more than the budget (RSS sampled from the moment the process
starts, loading included) and never reports negative headroom.

The minimum is the one `fitserve serve` itself computes (it measures its own runtime at start), read from its
"nothing fits" message at a 1 MiB budget. Set FITSERVE_BUDGET_REPORT=path to write the measurements as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fitserve.loadtest.process_memory import RssSampler
from tests.live_server import free_port, stop_server

pytestmark = pytest.mark.integration

MIB = 1 << 20
BATCH_CAP = 4  # --max-batch-size: the plan's cap on running sequences, and the load's concurrency
COMMON = ["--max-batch-size", str(BATCH_CAP), "--max-model-len", "512", "--log-level", "INFO"]
REPORT: dict[str, dict[str, float]] = {}


def serve_minimum_bytes(precision: str, backend: str) -> int:
    """What `fitserve serve` says this precision on this kernel backend needs, asked with a budget far too small."""
    forced = ["--precision", precision, "--quant-backend", backend]
    command = [sys.executable, "-m", "fitserve", "serve", *forced, "--memory-budget", "1MiB"]
    result = subprocess.run([*command, *COMMON], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    match = re.search(rf"forced precision {precision} needs [\d.]+ \w+ \((\d+) bytes", result.stderr)
    assert match, result.stderr[-2000:]
    return int(match.group(1))


@contextmanager
def sampled_server(args: list[str], log_path: Path) -> Iterator[tuple[str, RssSampler]]:
    """Start `fitserve serve` on 127.0.0.1, sample its RSS from the first moment, wait for /ready."""
    port = free_port()
    command = [sys.executable, "-m", "fitserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    sampler = RssSampler(process.pid)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-4000:]
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"not ready in time:\n{log_path.read_text()[-4000:]}")
        yield base, sampler
    finally:
        sampler.stop()
        stop_server(process, 60)


def headroom_bytes(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    match = re.search(r'^fitserve_memory_headroom_bytes\{device="cpu"\} (\S+)$', text, re.M)
    assert match, text[:2000]
    return float(match.group(1))


# (precision, --quant-backend): on CPU "auto" runs int8/int4 on torch's weight-only kernels and nf4 on bitsandbytes
CASES = [
    ("fp32", "auto"),
    ("bf16", "auto"),
    ("int8", "torch"),
    ("int4", "torch"),
    ("int8", "bitsandbytes"),
    ("nf4", "bitsandbytes"),
]


@pytest.mark.parametrize(("precision", "backend"), CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_served_rss_stays_within_the_budget(
    precision: str, backend: str, default_model_dir: Path, tmp_path: Path
) -> None:
    minimum = serve_minimum_bytes(precision, backend)
    budget = int(minimum * 1.05)
    args = ["--precision", precision, "--quant-backend", backend, "--memory-budget", str(budget), *COMMON]
    headrooms: list[float] = []
    with sampled_server(args, tmp_path / "serve.log") as (base, sampler):
        load_peak = sampler.peak_bytes
        headrooms.append(headroom_bytes(base))

        def one(i: int) -> None:
            body = {
                "model": "smollm2-135m-instruct",
                "prompt": f"Request {i}: " + "tell me about the sea. " * 20,
                "max_tokens": 8,
                "temperature": 0,
            }
            response = httpx.post(f"{base}/v1/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text

        threads = [threading.Thread(target=one, args=(i,)) for i in range(BATCH_CAP * 2)]  # two waves at the cap
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            headrooms.append(headroom_bytes(base))
            time.sleep(0.25)
        for thread in threads:
            thread.join()
        headrooms.append(headroom_bytes(base))
        peak = sampler.stop()
    REPORT[f"{precision}-{backend}"] = {
        "minimum_mib": minimum / MIB,
        "budget_mib": budget / MIB,
        "load_peak_rss_mib": load_peak / MIB,
        "peak_rss_mib": peak / MIB,
        "min_headroom_mib": min(headrooms) / MIB,
    }
    if os.environ.get("FITSERVE_BUDGET_REPORT"):
        Path(os.environ["FITSERVE_BUDGET_REPORT"]).write_text(json.dumps(REPORT, indent=2))
    assert peak <= budget, f"{precision}: peak RSS {peak / MIB:.1f} MiB over the {budget / MIB:.1f} MiB budget"
    assert min(headrooms) >= 0, f"{precision}: headroom went to {min(headrooms) / MIB:.1f} MiB"
