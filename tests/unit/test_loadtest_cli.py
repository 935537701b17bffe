"""The CLI end to end against the fake server: outputs written, modes, bad input, Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import signal
from pathlib import Path

import pytest

import fitserve.loadtest.cli as cli
from fitserve.loadtest.__main__ import main
from fitserve.loadtest.sweep import SweepState
from tests.loadtest_fakes import FakeBehaviour, create_fake_app, serve_in_thread

pytestmark = pytest.mark.timeout(60)


def test_concurrency_levels_write_json_csv_and_plots(tmp_path: Path) -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(fitserve_metrics=True))) as url:
        rc = main(
            [
                "--url",
                url,
                "--concurrency",
                "1,3",
                "--requests-per-level",
                "3",
                "--max-tokens",
                "2:4",
                "--poll-interval",
                "20ms",
                "--quiet",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "concurrency" and results["verdict"] is None and not results["interrupted"]
    assert [lv["requests_ok"] for lv in results["levels"]] == [3, 6]  # closed loop: >= 2 x concurrency
    level = results["levels"][1]
    assert 12 <= level["output_tokens"] <= 24 and level["output_tokens_per_s"] > 0
    assert set(level["ttft_s"]) >= {"p50", "p90", "p99"} and level["ttft_s"]["count"] == 6
    assert level["server_metrics"]["memory_budget_bytes"] == 2 * 1024**3
    assert results["config"]["max_tokens"] == "2:4" and "api_key" not in results["config"]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["concurrency"] for r in rows] == ["1", "3"] and rows[1]["passed"] == "True"
    assert (tmp_path / "throughput_latency.png").stat().st_size > 1000
    assert (tmp_path / "memory.png").stat().st_size > 1000


def test_rate_mode_and_failures_by_status(tmp_path: Path) -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(reject_above=1, reject_status=429))) as url:
        rc = main(
            [
                "--url",
                url,
                "--model",
                "fake-model",
                "--endpoint",
                "completions",
                "--rate",
                "40",
                "--requests-per-level",
                "10",
                "--max-tokens",
                "4",
                "--quiet",
                "--no-plots",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == 0
    level = json.loads((tmp_path / "results.json").read_text())["levels"][0]
    assert level["rate_rps"] == 40 and level["concurrency"] is None
    assert level["requests_ok"] + level["requests_failed"] == 10
    assert level["requests_failed"] == level["failures_by_status"].get("429", 0) > 0  # overlapping arrivals get 429


def test_bad_dataset_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert main(["--dataset", str(bad), "--quiet"]) == cli.EXIT_USAGE
    assert main(["--dataset", str(tmp_path / "missing.jsonl"), "--quiet"]) == cli.EXIT_USAGE


def test_unreachable_server_fails_cleanly(tmp_path: Path) -> None:
    assert main(["--url", "http://127.0.0.1:9", "--quiet", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "results.json").read_text())["levels"] == []


def test_ctrl_c_writes_what_it_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run_sweep = cli.run_sweep

    async def interrupted_after_one_level(args, state: SweepState, workload, progress) -> None:
        args.concurrency = [1]
        await real_run_sweep(args, state, workload, progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_sweep", interrupted_after_one_level)
    with serve_in_thread(create_fake_app(FakeBehaviour())) as url:
        rc = main(
            [
                "--url",
                url,
                "--concurrency",
                "1,2,4",
                "--requests-per-level",
                "2",
                "--max-tokens",
                "2",
                "--quiet",
                "--no-plots",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == cli.EXIT_INTERRUPTED
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True and [lv["concurrency"] for lv in results["levels"]] == [1]


def test_sigterm_writes_what_it_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run_sweep = cli.run_sweep

    async def terminated_after_one_level(args, state: SweepState, workload, progress) -> None:
        args.concurrency = [1]
        await real_run_sweep(args, state, workload, progress)
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        await asyncio.sleep(5)  # the handler interrupts this

    monkeypatch.setattr(cli, "run_sweep", terminated_after_one_level)
    before = signal.getsignal(signal.SIGTERM)
    with serve_in_thread(create_fake_app(FakeBehaviour())) as url:
        rc = main(
            [
                "--url",
                url,
                "--concurrency",
                "1,2",
                "--requests-per-level",
                "2",
                "--max-tokens",
                "2",
                "--quiet",
                "--no-plots",
                "--out",
                str(tmp_path),
            ]
        )
    assert rc == cli.EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is only installed while the run lasts
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True and [lv["concurrency"] for lv in results["levels"]] == [1]


def test_registers_on_the_fitserve_dispatcher() -> None:
    parser = argparse.ArgumentParser(prog="fitserve")
    cli.add_loadtest_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["loadtest", "--find-max-batch", "--slo-ttft-p95", "500ms", "--slo-e2e-p95", "2"])
    assert args.func is cli.run_loadtest and args.slo_ttft_p95 == 0.5 and args.slo_e2e_p95 == 2.0
    with pytest.raises(SystemExit):
        parser.parse_args(["loadtest", "--rate", "1", "--concurrency", "2"])  # one mode only
