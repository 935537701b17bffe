"""`live_server`: run a real `fitserve serve` subprocess for integration tests.

    with live_server(["--model", str(model_dir), "--max-batch-size", "4"]) as base_url:
        httpx.get(f"{base_url}/health")

The server binds a free 127.0.0.1 port, is waited on until `/ready` answers 200, and is stopped with SIGTERM
(then SIGKILL if it does not exit) when the block ends. If it dies or never gets ready, the error carries the
tail of its log; if the block raises, the log tail is written to stderr so pytest shows it with the failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL_CHARS = 8000


class LiveServerError(RuntimeError):
    """The server process failed to start or to become ready."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def live_server(
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 300.0,
    stop_timeout_s: float = 60.0,
    api_key: str | None = None,
) -> Iterator[str]:
    """Start `python -m fitserve serve *args --port <free>`, wait for /ready, yield the base URL, stop it.

    `env` entries are added to the current environment. `api_key`, when the server was given one, is sent
    with the readiness probe (only /v1 routes need it, so it is rarely needed).
    """
    port = free_port()
    command = [sys.executable, "-m", "fitserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w+b", prefix="fitserve-serve-", suffix=".log", delete=False) as log_file:
        log_path = Path(log_file.name)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(process, base_url, log_path, ready_timeout_s, api_key)
        try:
            yield base_url
        except BaseException:
            sys.stderr.write(f"--- fitserve serve log ({log_path}) ---\n{read_log_tail(log_path)}\n")
            raise
    finally:
        stop_server(process, stop_timeout_s)
    with contextlib.suppress(OSError):
        log_path.unlink()


def read_log_tail(log_path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last `chars` characters of the server log."""
    try:
        return log_path.read_bytes()[-chars:].decode("utf-8", errors="replace")
    except OSError as error:
        return f"(log unavailable: {error})"


def stop_server(process: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """SIGTERM, wait up to `timeout_s`, then SIGKILL; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    return process.returncode


def wait_ready(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout_s: float, api_key: str | None = None
) -> None:
    """Poll /ready until 200 (bounded by `timeout_s`); `LiveServerError` with the log tail otherwise."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5.0, headers=headers) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LiveServerError(
                    f"fitserve serve exited with status {process.returncode} before it was ready:\n"
                    f"{read_log_tail(log_path)}"
                )
            try:
                if client.get(f"{base_url}/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    raise LiveServerError(f"fitserve serve was not ready after {timeout_s:.0f}s:\n{read_log_tail(log_path)}")
