"""Acceptance: SIGTERM drains — an in-flight stream finishes, new work is refused, the process exits 0."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import REPO_ROOT, free_port, read_log_tail, stop_server

pytestmark = pytest.mark.integration


def test_sigterm_finishes_running_stream_then_exits(default_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--model",
        str(default_model_dir),
        "--served-model-name",
        "smol",
        "--max-model-len",
        "256",
        "--max-kv-tokens",
        "4096",
        "--port",
        str(port),
        "--shutdown-timeout",
        "120",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, read_log_tail(log_path)
            try:
                if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        lines: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            body = {
                "model": "smol",
                "prompt": "Tell me a story:",
                "max_tokens": 40,
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
        reader.join(timeout=300)
        assert not reader.is_alive()
        assert lines[-1] == "data: [DONE]", lines[-3:]
        assert '"finish_reason":"length"' in lines[-2]
        assert process.wait(timeout=120) == 0, read_log_tail(log_path)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/health", timeout=2)
    finally:
        stop_server(process, 30)
