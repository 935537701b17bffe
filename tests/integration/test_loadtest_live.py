"""`fitserve loadtest --find-max-batch` against a real `fitserve serve` on the default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fitserve.loadtest.__main__ import main
from tests.live_server import live_server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_find_max_batch_finds_the_servers_batch_cap(default_model_dir: Path, tmp_path: Path) -> None:
    """With --max-batch-size 2, a third concurrent request can only queue: the search must report 2.

    The cap is observable from outside through /metrics: at concurrency 3 the server never runs more than
    2 requests while one waits (fitserve_requests_waiting > 0), so that level fails with `queueing` (or 429
    if the bounded queue is full on arrival) and the bisection lands on 2.
    """
    with live_server(["--model", str(default_model_dir), "--max-batch-size", "2", "--max-waiting", "4"]) as url:
        rc = main(
            [
                "--url",
                url,
                "--find-max-batch",
                "--max-concurrency",
                "4",
                "--requests-per-level",
                "2",
                "--max-tokens",
                "12",
                "--prompt-words",
                "16",
                "--ignore-eos",
                "--poll-interval",
                "100ms",
                "--level-time-limit",
                "240",
                "--request-timeout",
                "240",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    verdict = results["verdict"]
    assert verdict["largest_passing_concurrency"] == 2
    assert verdict["first_failing_concurrency"] == 3
    assert {r["reason"] for r in verdict["reasons"]} <= {"queueing", "http_429"}
    assert verdict["server_max_batch_size"] == 2
    assert verdict["predicted_capacity"] == 2  # the batch cap binds long before the KV cache does
    passing = [lv for lv in results["levels"] if lv["concurrency"] in (1, 2)]
    assert all(lv["requests_failed"] == 0 and lv["output_tokens"] > 0 for lv in passing)
    assert all(lv["server_metrics"]["peak_memory_used_bytes"] > 0 for lv in passing)
    assert (tmp_path / "throughput_latency.png").exists() and (tmp_path / "memory.png").exists()
