"""A `fitserve serve --replicas N` subprocess for the Ray tests, and small polling helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from tests.live_server import free_port

API_KEY = "ray-test-key"


@dataclass
class ScaleOutServer:
    """A running scale-out server: its URL, process, log and every process it started."""

    url: str
    process: subprocess.Popen
    log_path: Path
    started_at: float
    ready_after_s: float = 0.0
    descendants: set[int] = field(default_factory=set)

    def remember_descendants(self) -> None:
        """Record the pids of everything the server started (Ray's GCS, raylet, workers, replicas)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            self.descendants |= {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}

    def processes_named(self, fragment: str) -> list[psutil.Process]:
        """Live descendants whose name or command line contains `fragment`."""
        found = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if fragment in child.name() or fragment in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5) -> object:
    """Poll until `predicate()` is truthy; AssertionError naming `what` after `timeout_s` (bounded loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = predicate()
        except (httpx.HTTPError, psutil.Error):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@contextlib.contextmanager
def scale_out_server(args: Sequence[str], ready_timeout_s: float = 240.0) -> Iterator[ScaleOutServer]:
    """Start `python -m fitserve serve --replicas ... --port <free>` on 127.0.0.1; SIGTERM it at the end."""
    port = free_port()
    command = [sys.executable, "-m", "fitserve", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    log_path = Path(tempfile.mkstemp(prefix="fitserve-ray-", suffix=".log")[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ScaleOutServer(f"http://127.0.0.1:{port}", process, log_path, time.monotonic())
    try:
        wait_for(
            lambda: process.poll() is None and httpx.get(f"{server.url}/ready", timeout=2).status_code == 200,
            ready_timeout_s,
            "the scale-out server to be ready",
        )
        server.ready_after_s = time.monotonic() - server.started_at
        server.remember_descendants()
        yield server
    except BaseException:
        sys.stderr.write(server.log_tail())
        raise
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
