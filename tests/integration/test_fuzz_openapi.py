"""schemathesis against the live server's own /openapi.json: no 5xx, no response outside the document.

The real server (real engine, tokenizer and chat template) on the tiny random Llama at 127.0.0.1, so a step costs
milliseconds even on a busy 2-core machine; a fixed seed, a bounded number of cases per operation, and a time box
(schemathesis' `--max-time` of 150 s, with a 240 s subprocess timeout as the hard stop); `--max-model-len 128`
keeps every generation short. `make fuzz` runs this.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.live_server import live_server

pytestmark = pytest.mark.integration

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
SEED = "20261203"
FUZZ_TIME_S = 150  # schemathesis' own budget: the fuzzing phase repeats until it is spent
TIME_BOX_S = 240  # the hard stop, server start-up not included
MIN_CASES = 300


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model_dir), "--max-model-len", "128", "--max-batch-size", "4"]
    with live_server(args) as base_url:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{base_url}/openapi.json",
                "--checks",
                CHECKS,
                "--seed",
                SEED,
                "--max-examples",
                "30",
                "--max-time",
                str(FUZZ_TIME_S),
                "--workers",
                "1",
                "--request-timeout",
                "60",
                "--no-shrink",
            ],
            capture_output=True,
            text=True,
            timeout=TIME_BOX_S,
            cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
        )
        report = run.stdout[-8000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
        assert counts is not None, report
        generated, passed = int(counts.group(1)), int(counts.group(2))
        assert generated == passed >= MIN_CASES, report
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200  # alive afterwards
