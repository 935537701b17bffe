"""--find-max-batch against a real-socket fake OpenAI server whose capacity is planted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fitserve.loadtest.__main__ import main
from tests.loadtest_fakes import FakeBehaviour, create_fake_app, serve_in_thread

pytestmark = pytest.mark.timeout(60)


def _find_max_batch(url: str, out: Path, *extra: str, max_concurrency: int = 32) -> dict:
    rc = main(
        [
            "--url",
            url,
            "--find-max-batch",
            "--max-concurrency",
            str(max_concurrency),
            "--requests-per-level",
            "4",
            "--max-tokens",
            "3",
            "--poll-interval",
            "20ms",
            "--request-timeout",
            "10",
            "--quiet",
            "--no-plots",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads((out / "results.json").read_text())


def _concurrencies(results: dict) -> list[int]:
    return [lv["concurrency"] for lv in results["levels"]]


def test_finds_planted_503_limit(tmp_path: Path) -> None:
    behaviour = FakeBehaviour(reject_above=6, reject_status=503)
    with serve_in_thread(create_fake_app(behaviour)) as url:
        results = _find_max_batch(url, tmp_path)
    verdict = results["verdict"]
    assert verdict["largest_passing_concurrency"] == 6
    assert verdict["first_failing_concurrency"] == 7
    assert [r["reason"] for r in verdict["reasons"]] == ["http_5xx"]
    assert _concurrencies(results) == [1, 2, 4, 8, 6, 7]  # ramp, then bisect; nothing run twice
    failing = results["levels"][-1]
    assert failing["failures_by_status"].get("503", 0) >= 1
    assert results["levels"][0]["server_metrics"] is None  # this fake exposes no fitserve_* series
    assert verdict["predicted_capacity"] is None


def test_finds_planted_ttft_objective(tmp_path: Path) -> None:
    # The objective sits far from both the fast path (~50 ms) and the slow one (>= 1 s) so that a loaded
    # 2-core machine cannot flip a level; the bound of 11 keeps it to one slow (failing) level.
    behaviour = FakeBehaviour(slow_ttft_above=10, slow_ttft_s=1.0)
    with serve_in_thread(create_fake_app(behaviour)) as url:
        results = _find_max_batch(url, tmp_path, "--slo-ttft-p95", "700ms", max_concurrency=11)
    verdict = results["verdict"]
    assert verdict["largest_passing_concurrency"] == 10
    assert verdict["first_failing_concurrency"] == 11
    assert [r["reason"] for r in verdict["reasons"]] == ["slo_ttft_p95"]
    assert _concurrencies(results) == [1, 2, 4, 8, 11, 9, 10]
    passing = next(lv for lv in results["levels"] if lv["concurrency"] == 10)
    assert passing["ttft_s"]["p95"] < 0.7 and passing["requests_failed"] == 0


def test_finds_max_batch_size_from_queueing_metrics(tmp_path: Path) -> None:
    behaviour = FakeBehaviour(max_batch_size=3, fitserve_metrics=True)
    with serve_in_thread(create_fake_app(behaviour)) as url:
        results = _find_max_batch(url, tmp_path)
    verdict = results["verdict"]
    assert verdict["largest_passing_concurrency"] == 3
    assert [r["reason"] for r in verdict["reasons"]] == ["queueing"]
    assert verdict["server_max_batch_size"] == 3
    # 4096 KV tokens / (20 prompt + 3 max_tokens) = 178 requests; the batch cap is the binding limit.
    assert verdict["predicted_kv_capacity_requests"] == 4096 // 23
    assert verdict["predicted_capacity"] == 3


def test_queueing_tolerated_when_allowed_and_oom_detected(tmp_path: Path) -> None:
    behaviour = FakeBehaviour(max_batch_size=3, oom_above=4, fitserve_metrics=True)
    with serve_in_thread(create_fake_app(behaviour)) as url:
        results = _find_max_batch(url, tmp_path, "--allow-queueing")
    verdict = results["verdict"]
    assert verdict["largest_passing_concurrency"] == 4
    assert [r["reason"] for r in verdict["reasons"]] == ["oom_event"]
    failing = next(lv for lv in results["levels"] if lv["concurrency"] == 5)
    assert failing["server_metrics"]["oom_events_delta"] >= 1
    assert failing["requests_failed"] == 0
