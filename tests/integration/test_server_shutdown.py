"""Acceptance: SIGTERM drains (an in-flight stream finishes, new work is refused, exit 0); a dead engine loop
fails /health and the process exits 1 after draining."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import REPO_ROOT, free_port, read_log_tail, stop_server, wait_ready

pytestmark = pytest.mark.integration


def start_serve(args: list[str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m fitserve serve *args` on a free port (not via live_server: these tests signal it themselves)."""
    port = free_port()
    command = [sys.executable, "-m", "fitserve", "serve", *args, "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def test_sigterm_finishes_running_stream_then_exits(default_model_dir: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    args = ["--model", str(default_model_dir), "--served-model-name", "smol", "--max-model-len", "512"]
    args += ["--max-kv-tokens", "4096", "--shutdown-timeout", "120"]
    process, base_url = start_serve(args, log_path)
    try:
        wait_ready(process, base_url, log_path, timeout_s=300)
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "model": "smol",
                "prompt": "Tell me a story:",
                "max_tokens": 64,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
            }
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(120), read_log_tail(log_path)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # let the signal land
        refused = refuse_new_work(base_url)
        assert reader.is_alive(), "the stream ended before new work was tried: the drain window was not tested"
        assert refused in ("connection refused", "503 engine_unavailable"), refused
        reader.join(timeout=300)
        assert not reader.is_alive()
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"finish_reason":"length"' in lines[-2]
        assert process.wait(timeout=120) == 0, read_log_tail(log_path)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/health", timeout=2)
    finally:
        stop_server(process, 30)


def refuse_new_work(base_url: str) -> str:
    """Send a new completion during the drain; how it was refused (a 200 fails the test)."""
    body = {"model": "smol", "prompt": "Another one:", "max_tokens": 4}
    try:
        response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    except httpx.ConnectError:
        return "connection refused"
    assert response.status_code == 503, response.text
    return f"503 {response.json()['error']['code']}"


def test_engine_death_fails_health_and_exits_non_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The fault-injection hook kills the engine loop at step 3: /health turns 503, the process exits 1."""
    log_path = tmp_path / "serve.log"
    args = ["--model", str(tiny_model_dir), "--max-model-len", "256"]
    args += ["--crash-inject-step", "3", "--shutdown-timeout", "20"]
    process, base_url = start_serve(args, log_path)
    try:
        wait_ready(process, base_url, log_path, timeout_s=300)
        deadline = time.monotonic() + 300
        assert httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        model = httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 16, "ignore_eos": True}
        dead = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
        assert dead.status_code == 503, dead.text
        assert "injected" not in dead.text  # the cause is logged, not sent
        health_codes = []
        while process.poll() is None and time.monotonic() < deadline:
            try:
                health_codes.append(httpx.get(f"{base_url}/health", timeout=2).status_code)
            except httpx.TransportError:
                break
            time.sleep(0.1)
        assert 200 not in health_codes, health_codes
        assert process.wait(timeout=60) == 1, read_log_tail(log_path)
        assert "injected engine crash" in read_log_tail(log_path)
    finally:
        stop_server(process, 30)
