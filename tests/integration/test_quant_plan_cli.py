"""`fitserve plan` as a user runs it: a separate process, the installed console script, wall-clock time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fitserve.quant.budget import read_cpu_flags

pytestmark = pytest.mark.integration


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    exe = shutil.which("fitserve", path=str(Path(sys.executable).parent))
    cmd = [exe, "plan", *argv] if exe else [sys.executable, "-m", "fitserve.quant", *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)
    return proc, time.perf_counter() - start


def test_plan_json_cold_then_warm(default_model_dir: Path, tmp_path: Path) -> None:
    env = {"FITSERVE_HOME": str(tmp_path)}
    cold, cold_s = run_cli("--model", str(default_model_dir), "--memory-budget", "8GiB", "--json", env=env)
    assert cold.returncode == 0, cold.stderr
    # plenty of room: 16-bit, or fp32 above it on a CPU without native bf16 (the planner says why)
    cold_plan = json.loads(cold.stdout)
    native_bf16 = bool(read_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    assert cold_plan["chosen"] == ("bf16" if native_bf16 else "fp32"), cold_plan["reason"]
    if not native_bf16:
        assert "fp32 compute is faster" in cold_plan["reason"]
        sixteen, _ = run_cli(
            "--model", str(default_model_dir), "--memory-budget", "8GiB", "--json", "--no-prefer-fp32-on-cpu", env=env
        )
        assert json.loads(sixteen.stdout)["chosen"] == "bf16"
    # the cold run built the meta-device skeleton once and cached the shape; the warm run reads it (no rebuild)
    (shape_file,) = (tmp_path / "shapes").glob("*.json")
    cached = shape_file.stat().st_mtime_ns
    warm, warm_s = run_cli("--model", str(default_model_dir), "--memory-budget", "8GiB", "--json", env=env)
    assert warm.returncode == 0 and json.loads(warm.stdout) == json.loads(cold.stdout)
    assert shape_file.stat().st_mtime_ns == cached and list((tmp_path / "shapes").glob("*.json")) == [shape_file]
    print(f"fitserve plan: cold {cold_s:.2f}s, warm {warm_s:.2f}s (informational; timing is not asserted)")


def test_default_model_and_exit_3(default_model_dir: Path) -> None:
    proc, _ = run_cli("--memory-budget", "40MiB")
    assert proc.returncode == 3
    assert "nothing fits" in proc.stderr and "short by" in proc.stderr


def test_python_m_quant_human_output(default_model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fitserve.quant", "--model", str(default_model_dir), "--memory-budget", "1GiB"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # 1 GiB: fp32's minimum (1.2 GiB with its load peak) does not fit, bf16 does; INT8/NF4 need more than bf16
    # while bitsandbytes loads them on CPU (docs/memory-model.md), so the ladder stops at bf16
    assert "memory plan" in proc.stdout and "BF16 on cpu" in proc.stdout
