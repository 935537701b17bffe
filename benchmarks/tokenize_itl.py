"""Inter-token latency of one stream alone vs while 20 concurrent ~1 MiB `/tokenize` requests arrive.

Starts `fitserve serve` on 127.0.0.1 (the default model unless --model), then alternates, `--rounds` times:
"alone" (one greedy stream of --max-tokens tokens) and "loaded" (the same stream, started right after
--tokenize-requests concurrent /tokenize bodies of just under --tokenize-bytes each were sent; the round waits
until they are all answered). ITL = the gaps between the stream's content chunks. Prints the per-run p50/p99
and the medians over rounds, and writes them as JSON. Target (issue 13 item 3): loaded p99 <= 2x alone p99.

    .venv/bin/python benchmarks/tokenize_itl.py --rounds 3 --out bench-out/tokenize_itl.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 600.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`fitserve serve` in a subprocess, logging to `log_path`."""
    command = [sys.executable, "-m", "fitserve", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--max-model-len", "512", "--tokenizer-workers", str(args.tokenizer_workers)]
    if args.model:
        command += ["--model", args.model]
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )


def wait_ready(base_url: str, process: subprocess.Popen[bytes]) -> str:
    """Wait for /ready (bounded); the served model name."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{base_url}/ready", timeout=2).status_code == 200:
                return str(httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"])
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not get ready")


async def stream_gaps(client: httpx.AsyncClient, model: str, max_tokens: int) -> list[float]:
    """Seconds between consecutive content chunks of one greedy completion stream."""
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals: list[float] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.perf_counter())
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


async def tokenize(client: httpx.AsyncClient, model: str, text: str) -> int:
    """One /tokenize request; its HTTP status."""
    response = await client.post("/tokenize", json={"model": model, "prompt": text})
    return response.status_code


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def one_run(base_url: str, model: str, args: argparse.Namespace, loaded: bool) -> dict[str, Any]:
    """One stream, alone or under the /tokenize load; its ITL p50/p99 in milliseconds."""
    limits = httpx.Limits(max_connections=args.tokenize_requests + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        load: list[asyncio.Task[int]] = []
        if loaded:
            text = ("The quick brown fox jumps over the lazy dog. " * (args.tokenize_bytes // 45 + 1))[
                : args.tokenize_bytes
            ]
            load = [asyncio.create_task(tokenize(client, model, text)) for _ in range(args.tokenize_requests)]
            await asyncio.sleep(args.load_head_start_s)
        started = time.perf_counter()
        gaps = await stream_gaps(client, model, args.max_tokens)
        stream_s = time.perf_counter() - started
        statuses = await asyncio.gather(*load)
    return {
        "mode": "loaded" if loaded else "alone",
        "itl_p50_ms": 1000 * percentile(gaps, 0.5),
        "itl_p99_ms": 1000 * percentile(gaps, 0.99),
        "chunks": len(gaps) + 1,
        "stream_s": stream_s,
        "tokenize_statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
    }


def main() -> int:
    """Run the benchmark; print and write the numbers."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the cached default model)")
    parser.add_argument("--rounds", type=int, default=3, help="alone/loaded pairs (default 3)")
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens of the measured stream (default 96)")
    parser.add_argument("--tokenize-requests", type=int, default=20, help="concurrent /tokenize requests (20)")
    parser.add_argument(
        "--tokenize-bytes", type=int, default=(1 << 20) - 256, help="prompt size of each (just under 1 MiB)"
    )
    parser.add_argument("--load-head-start-s", type=float, default=0.2, help="load sent this long before the stream")
    parser.add_argument("--tokenizer-workers", type=int, default=2, help="the server's --tokenizer-workers (2)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/tokenize_itl.json"))
    args = parser.parse_args()

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    process = start_server(args, port, args.out.with_suffix(".server.log"))
    try:
        model = wait_ready(base_url, process)
        asyncio.run(one_run(base_url, model, args, loaded=False))  # warm-up, not reported
        runs = []
        for round_index in range(args.rounds):
            for loaded in (False, True):
                run = asyncio.run(one_run(base_url, model, args, loaded))
                run["round"] = round_index
                runs.append(run)
                print(
                    f"round {round_index} {run['mode']:>6}: ITL p50 {run['itl_p50_ms']:7.1f} ms  "
                    f"p99 {run['itl_p99_ms']:7.1f} ms  ({run['chunks']} chunks, {run['stream_s']:.1f} s, "
                    f"tokenize {run['tokenize_statuses']})",
                    flush=True,
                )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    summary: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    for mode in ("alone", "loaded"):
        mine = [run for run in runs if run["mode"] == mode]
        summary[f"{mode}_itl_p99_ms_median"] = statistics.median(run["itl_p99_ms"] for run in mine)
        summary[f"{mode}_itl_p50_ms_median"] = statistics.median(run["itl_p50_ms"] for run in mine)
    summary["p99_ratio_loaded_over_alone"] = summary["loaded_itl_p99_ms_median"] / summary["alone_itl_p99_ms_median"]
    print(
        f"median ITL p99: alone {summary['alone_itl_p99_ms_median']:.1f} ms, loaded "
        f"{summary['loaded_itl_p99_ms_median']:.1f} ms, ratio {summary['p99_ratio_loaded_over_alone']:.2f} "
        "(target <= 2.0)"
    )
    args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
