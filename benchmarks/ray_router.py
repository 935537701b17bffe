"""Ray Serve routers side by side: fitserve's memory-aware router vs Ray Serve's default (power of two choices).

One local, loopback-only Ray instance; the same two-replica application is deployed with each router in turn
(alternating, `--rounds` times), and each deployment gets the same load: a mix of long (`--long-tokens`) and short
(`--short-tokens`) completions with ignore_eos, `--requests` per run, sent either by `--concurrency` clients in a
closed loop or, with `--rate`, as Poisson arrivals (open loop, as real users arrive: a replica that falls behind
keeps being sent work, where a closed loop would slow its own clients down). Long requests hold many KV tokens for a
long time; a queue-length router cannot tell them from short ones. The load is driven by `fitserve loadtest`'s level
runner. Prints p50/p95 latency, output tokens/s and 5xx per router (medians over rounds) and writes a JSON file.

    .venv-ray/bin/python benchmarks/ray_router.py --requests 48 --concurrency 12 --out bench-out/ray_router.json

Issue 14's target: p95 latency >= 20% lower than the default router's on the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fitserve.loadtest.client import OpenAIClient  # noqa: E402
from fitserve.loadtest.sweep import LevelResult, LevelRunner, LevelSpec  # noqa: E402
from fitserve.loadtest.verdict import Objectives  # noqa: E402
from fitserve.loadtest.workload import Endpoint, LengthSpec, WorkItem, Workload, builtin_prompt  # noqa: E402
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
    parser.add_argument("--concurrency", type=int, default=12, help="closed loop: clients sending one at a time")
    parser.add_argument("--rate", type=float, default=None, help="open loop instead: Poisson arrivals at R req/s")
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


class MixedWorkload(Workload):
    """Every `long_every`-th request asks for `long_tokens`, the others for `short_tokens`; fixed prompt length."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(
            LengthSpec(args.short_tokens, args.long_tokens), LengthSpec(args.prompt_words, args.prompt_words)
        )
        self.long_every, self.long_tokens, self.short_tokens = args.long_every, args.long_tokens, args.short_tokens

    def item(self, index: int) -> WorkItem:
        """Request `index`: the same prompt and length for every router."""
        long = index % self.long_every == 0
        max_tokens = self.long_tokens if long else self.short_tokens
        return WorkItem(index, builtin_prompt(index, self.prompt_words.low), max_tokens)


async def drive(url: str, args: argparse.Namespace, requests: int) -> LevelResult:
    """`requests` requests, closed loop at `--concurrency` or open loop at `--rate`."""
    if args.rate is not None:
        spec = LevelSpec(requests, args.timeout_s, rate_rps=args.rate)
    else:
        spec = LevelSpec(requests, args.timeout_s, concurrency=args.concurrency)
    async with OpenAIClient(
        url, None, Endpoint.COMPLETIONS, extra_body={"ignore_eos": True}, request_timeout_s=args.timeout_s
    ) as client:
        await client.resolve_model()
        return await LevelRunner(client, MixedWorkload(args), Objectives()).run(spec)


def summarise(level: LevelResult) -> dict[str, Any]:
    """The figures compared across routers."""
    return {
        "requests": level.ok + level.failed_requests,
        "ok": level.ok,
        "server_errors_5xx": sum(n for key, n in level.failures.items() if key.isdigit() and int(key) >= 500),
        "failures": level.failures,
        "p50_s": level.e2e.p50,
        "p95_s": level.e2e.p95,
        "ttft_p95_s": level.ttft.p95,
        "output_tokens_per_s": level.output_tokens_per_s,
        "wall_s": level.duration_s,
    }


def run_one(args: argparse.Namespace, router: str) -> dict[str, Any]:
    from ray import serve

    from fitserve.server.scaleout.app import build_app

    deploy_start = time.monotonic()
    serve.run(build_app(app_args(args, router)), name="fitserve", route_prefix="/")
    deployed_s = time.monotonic() - deploy_start
    url = f"http://127.0.0.1:{args.port}"
    asyncio.run(drive(url, argparse.Namespace(**{**vars(args), "rate": None}), 4))  # warm-up, closed loop
    summary = summarise(asyncio.run(drive(url, args, args.requests)))
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
        for key, field in (("p95", "p95_s"), ("ttft_p95", "ttft_p95_s"), ("throughput", "output_tokens_per_s"))
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
