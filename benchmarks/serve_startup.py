"""Start-up time and memory of `fitserve serve` variants: cold and warm compile cache, RSS at ready and at peak.

Each variant (`--variant NAME="serve args"`) starts `fitserve serve` on 127.0.0.1 with its own compile cache
(`TORCHINDUCTOR_CACHE_DIR` in a temporary folder): a cold start on the empty cache, then `--warm-starts` more on the
cache the first one filled. The server's RSS is sampled every 20 ms from launch until it has answered
`--requests` streaming chat requests one at a time; printed and written as JSON, with the log's decode-step line.

    .venv/bin/python benchmarks/serve_startup.py --variant off="--precision int4 --no-compile" \
        --variant auto="--precision int4" --out benchmarks/results/2026-12-04-cpu/serve_startup_int4.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fitserve.loadtest.process_memory import RssSampler  # noqa: E402

MIB = 1 << 20
DECODE_STEP_LINE = re.compile(r"decode step: (.*)")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until /ready answers 200; raises if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def one_start(serve_args: list[str], cache_dir: Path, log_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start the server once, answer `args.requests` requests, stop it; what it took."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "fitserve", "serve", *serve_args, "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    sampler = RssSampler(process.pid)
    try:
        wait_ready(base, process, args.ready_timeout)
        ready_s = time.perf_counter() - start
        ready_rss = sampler.last_bytes
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": args.max_tokens,
            "temperature": 0,
        }
        first_answer_s = None
        for _ in range(args.requests):
            httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300).raise_for_status()
            first_answer_s = first_answer_s or time.perf_counter() - start
        time.sleep(0.1)
        served_rss = sampler.last_bytes
    finally:
        sampler.stop()
        process.terminate()
        process.wait(timeout=60)
    lines = DECODE_STEP_LINE.findall(log_path.read_text(errors="replace"))
    return {
        "ready_s": ready_s,
        "first_answer_s": first_answer_s,
        "rss_at_ready_mib": ready_rss / MIB,
        "rss_after_requests_mib": served_rss / MIB,
        "peak_rss_mib": sampler.peak_bytes / MIB,
        "decode_step": lines[0] if lines else None,  # the runner's line (the engine-started line repeats the mode)
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, help='NAME="fitserve serve args" (repeatable)')
    p.add_argument("--warm-starts", type=int, default=1, help="starts on the cache the cold start filled")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ready-timeout", type=float, default=900)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Every variant cold, then warm; print the table, write JSON."""
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"command": shlex.join([sys.executable, *sys.argv]), "cpus": os.cpu_count()}
    table = Table(title="fitserve serve start-up")
    for col in ("variant", "start", "ready s", "first answer s", "RSS ready MiB", "RSS served MiB", "peak MiB"):
        table.add_column(col)
    for spec in args.variant:
        name, _, serve_args = spec.partition("=")
        runs = []
        with tempfile.TemporaryDirectory(prefix=f"fitserve-compile-{name}-") as cache:
            for i in range(1 + args.warm_starts):
                kind = "cold" if i == 0 else "warm"
                log_path = args.out.with_name(f"{args.out.stem}.{name}.{i}.log")
                run = {"start": kind, **one_start(shlex.split(serve_args), Path(cache), log_path, args)}
                runs.append(run)
                table.add_row(
                    name,
                    kind,
                    f"{run['ready_s']:.1f}",
                    f"{run['first_answer_s']:.1f}",
                    f"{run['rss_at_ready_mib']:.0f}",
                    f"{run['rss_after_requests_mib']:.0f}",
                    f"{run['peak_rss_mib']:.0f}",
                )
                print(f"{name} {kind}: {run}", flush=True)
        results[name] = {"serve_args": serve_args, "runs": runs}
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
