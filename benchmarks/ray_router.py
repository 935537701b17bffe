"""Ray Serve routers side by side: fitserve's memory-aware router vs Ray Serve's default (power of two choices).

One local, loopback-only Ray instance; the same two-replica application is deployed with each router in turn
(alternating, `--rounds` times), and each deployment gets the same closed-loop load: `--concurrency` clients,
a mix of long (`--long-tokens`) and short (`--short-tokens`) completions with ignore_eos, `--requests` per run.
Long requests hold many KV tokens for a long time; a queue-length router cannot tell them from short ones.
Prints p50/p95 latency, output tokens/s and 5xx per router (medians over rounds) and writes a JSON file.

    .venv-ray/bin/python benchmarks/ray_router.py --requests 48 --concurrency 12 --out bench-out/ray_router.json

Issue 14's target: p95 latency >= 20% lower than the default router's on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fitserve.loadtest.client import OpenAIClient, RequestResult  # noqa: E402
from fitserve.loadtest.workload import Endpoint, WorkItem, builtin_prompt  # noqa: E402
from fitserve.server.scaleout.launch import start_local_ray  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir (default: the cached default model)")
    parser.add_argument("--memory-budget", default="1GiB", help="per replica")
    parser.add_argument("--max-kv-tokens", type=int, default=2048, help="per replica: small, so KV is the limit")
    parser.add_argument(
        "--replica-max-kv-tokens",
        type=lambda text: [int(part) for part in text.split(",")],
        default=None,
        help="KV cap per replica by rank instead, e.g. 512,1536 (replicas of unequal capacity)",
    )
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--requests", type=int, default=48, help="requests per run (bounded)")
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--long-tokens", type=int, default=192)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-every", type=int, default=3, help="every n-th request is long")
    parser.add_argument("--prompt-words", type=int, default=24, help="prompt length (words, ~1.3 tokens each)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating deployments per router")
    parser.add_argument(
        "--routers",
        type=lambda text: text.split(","),
        default=["memory", "default"],
        help="memory (fitserve's, as configured by default), memory-hold (with late binding: router_max_hold_s 30), "
        "default (Ray Serve's)",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=Path("bench-out/ray_router.json"))
    return parser.parse_args()


def app_args(args: argparse.Namespace, router: str) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "memory_budget": args.memory_budget,
        "max_kv_tokens": args.max_kv_tokens,
        "max_batch_size": args.max_batch_size,
        "max_model_len": args.max_model_len,
    }
    if args.model:
        settings["model"] = args.model
    replica_settings = [{"max_kv_tokens": tokens} for tokens in args.replica_max_kv_tokens or ()]
    hold = {"router_max_hold_s": 30.0} if router == "memory-hold" else {}
    kind = "memory" if router.startswith("memory") else router
    return {"settings": settings, "num_replicas": 2, "router": kind, "replica_settings": replica_settings, **hold}


async def drive(url: str, args: argparse.Namespace) -> list[RequestResult]:
    """Closed loop: `concurrency` workers take the next request until `requests` were sent."""
    items = [
        WorkItem(
            i, builtin_prompt(i, args.prompt_words), args.long_tokens if i % args.long_every == 0 else args.short_tokens
        )
        for i in range(args.requests)
    ]
    queue: asyncio.Queue[WorkItem] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    results: list[RequestResult] = []
    async with OpenAIClient(
        url, None, Endpoint.COMPLETIONS, extra_body={"ignore_eos": True}, request_timeout_s=args.timeout_s
    ) as client:
        await client.resolve_model()

        async def worker() -> None:
            while not queue.empty():
                results.append(await client.send(queue.get_nowait()))

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return results


def summarise(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    latencies = sorted(r.e2e_s for r in results if r.ok and r.e2e_s is not None)
    p95_index = max(0, math.ceil(0.95 * len(latencies)) - 1)
    return {
        "requests": len(results),
        "ok": sum(r.ok for r in results),
        "server_errors_5xx": sum(1 for r in results if (r.status_code or 0) >= 500),
        "failures": dict(Counter(r.failure_key for r in results if not r.ok)),
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[p95_index] if latencies else None,
        "output_tokens_per_s": sum(r.output_tokens for r in results) / wall_s,
        "wall_s": wall_s,
    }


def run_one(args: argparse.Namespace, router: str) -> dict[str, Any]:
    from ray import serve

    from fitserve.server.scaleout.app import build_app

    deploy_start = time.monotonic()
    serve.run(build_app(app_args(args, router)), name="fitserve", route_prefix="/")
    deployed_s = time.monotonic() - deploy_start
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(drive(url, argparse.Namespace(**{**vars(args), "requests": 4})))  # warm-up
    started = time.monotonic()
    results = asyncio.run(drive(url, args))
    summary = summarise(results, time.monotonic() - started)
    summary["deploy_s"] = deployed_s
    serve.delete("fitserve")
    print(f"{router:>8}: {json.dumps(summary)}", flush=True)
    return summary


def main() -> int:
    args = parse_args()
    start_local_ray()
    import ray
    from ray import serve

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        runs: dict[str, list[dict[str, Any]]] = {router: [] for router in args.routers}
        for _ in range(args.rounds):
            for router in args.routers:
                runs[router].append(run_one(args, router))
    finally:
        serve.shutdown()
        ray.shutdown()

    def median(router: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[router])

    comparison = {
        f"{key}_{router}_over_default": median(router, field) / median("default", field)
        for router in args.routers
        if router != "default" and "default" in runs
        for key, field in (("p95", "p95_s"), ("throughput", "output_tokens_per_s"))
    }
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
        "comparison": comparison,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(comparison, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
