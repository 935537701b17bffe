"""The `fitserve loadtest` subcommand (also `python -m fitserve.loadtest`): arguments -> sweep -> report."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import threading
from pathlib import Path
from typing import Any

from rich.console import Console

from fitserve.loadtest.client import OpenAIClient
from fitserve.loadtest.progress import LiveProgress
from fitserve.loadtest.report import print_summary, write_results
from fitserve.loadtest.scrape import MetricsWatch
from fitserve.loadtest.sweep import LevelResult, LevelRunner, LevelSpec, Mode, SweepState, find_max_batch, run_levels
from fitserve.loadtest.verdict import Objectives
from fitserve.loadtest.workload import Endpoint, LengthSpec, Workload, load_dataset

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def parse_duration_s(text: str) -> float:
    """`"0.5"`, `"0.5s"` or `"500ms"` -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 0.5, 0.5s or 500ms, got {text!r}")
    value = float(m.group(1))
    return value / 1000.0 if m.group(2) == "ms" else value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _length(text: str) -> LengthSpec:
    try:
        return LengthSpec.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every loadtest option (shared by `fitserve loadtest` and `python -m fitserve.loadtest`)."""
    target = p.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:8000", help="server root (a trailing /v1 is accepted)")
    target.add_argument("--model", default=None, help="model name to request (default: first of GET /v1/models)")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    target.add_argument(
        "--endpoint",
        type=Endpoint,
        choices=list(Endpoint),
        default=Endpoint.CHAT,
        metavar="{chat,completions}",
        help="chat (/v1/chat/completions) or completions (/v1/completions)",
    )
    target.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: URL/metrics)")
    target.add_argument("--no-metrics", action="store_true", help="do not scrape /metrics")

    work = p.add_argument_group("workload")
    work.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="JSONL file: one prompt per line (a string, {'prompt': ...} or {'messages': [...]})",
    )
    work.add_argument(
        "--prompt-words",
        type=_length,
        default=LengthSpec(64, 64),
        help="built-in prompt length in words (~tokens): N or MIN:MAX (seeded uniform); default 64",
    )
    work.add_argument(
        "--max-tokens",
        type=_length,
        default=LengthSpec(64, 64),
        help="max_tokens per request: N or MIN:MAX (seeded uniform); default 64",
    )
    work.add_argument("--seed", type=int, default=0, help="seed of the prompt/length draws and of Poisson arrivals")
    work.add_argument("--no-stream", action="store_true", help="non-streaming requests (no TTFT/ITL)")
    work.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    work.add_argument(
        "--ignore-eos",
        action="store_true",
        help="send ignore_eos=true so every request generates max_tokens (fitserve, vLLM)",
    )

    mode = p.add_argument_group("mode (pick one; default --concurrency 1,4,16)").add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_int_list, default=None, help="closed loop at each level, e.g. 1,4,16")
    mode.add_argument("--rate", type=_float_list, default=None, help="open loop, Poisson arrivals at R req/s, e.g. 1,2")
    mode.add_argument(
        "--find-max-batch", action="store_true", help="ramp concurrency 1,2,4,... until a level fails, then bisect"
    )

    limits = p.add_argument_group("bounds")
    limits.add_argument(
        "--requests-per-level",
        type=_positive_int,
        default=32,
        help="requests per level (closed loop: at least 2 x concurrency); default 32",
    )
    limits.add_argument(
        "--level-time-limit",
        type=parse_duration_s,
        default=120.0,
        help="no new request after this long in a level (seconds); default 120",
    )
    limits.add_argument(
        "--request-timeout",
        type=parse_duration_s,
        default=120.0,
        help="a request not finished after this long fails as a timeout; default 120",
    )
    limits.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=256,
        help="--find-max-batch searches no higher than this; default 256",
    )
    limits.add_argument(
        "--poll-interval", type=parse_duration_s, default=0.25, help="/metrics poll period; default 0.25"
    )

    slo = p.add_argument_group("objectives (--find-max-batch)")
    slo.add_argument("--slo-ttft-p95", type=parse_duration_s, default=None, help="e.g. 2s or 500ms")
    slo.add_argument("--slo-itl-p95", type=parse_duration_s, default=None, help="e.g. 200ms")
    slo.add_argument("--slo-e2e-p95", type=parse_duration_s, default=None, help="e.g. 30s")
    slo.add_argument(
        "--allow-queueing",
        action="store_true",
        help="do not fail a level because requests queued behind the server's batch cap",
    )

    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="write results.json, results.csv and PNG plots here")
    out.add_argument("--no-plots", action="store_true", help="with --out: skip the PNG plots (matplotlib is slow)")
    out.add_argument("--quiet", action="store_true", help="no live progress")


def add_loadtest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `loadtest` subcommand on the `fitserve` dispatcher."""
    p = subparsers.add_parser(
        "loadtest",
        help="load-test any OpenAI-compatible server",
        description="Load-test an OpenAI-compatible server; find its largest passing batch.",
    )
    add_arguments(p)
    p.set_defaults(func=run_loadtest)
    return p


def mode_of(args: argparse.Namespace) -> Mode:
    """Which mode the arguments ask for."""
    if args.find_max_batch:
        return Mode.FIND_MAX_BATCH
    return Mode.RATE if args.rate else Mode.CONCURRENCY


def closed_loop_spec(args: argparse.Namespace, concurrency: int) -> LevelSpec:
    """A closed-loop level: at least two requests per worker so the concurrency is sustained."""
    return LevelSpec(
        num_requests=max(args.requests_per_level, 2 * concurrency),
        time_limit_s=args.level_time_limit,
        concurrency=concurrency,
    )


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as recorded in results.json (the API key is never written)."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in ("func", "api_key"):
            continue
        out[key] = value if isinstance(value, (int, float, str, bool, list, type(None))) else str(value)
    out["api_key_set"] = bool(args.api_key)
    return out


def build_workload(args: argparse.Namespace) -> Workload:
    """The workload the arguments describe (raises ValueError for a bad dataset)."""
    dataset = load_dataset(args.dataset) if args.dataset else None
    return Workload(max_tokens=args.max_tokens, prompt_words=args.prompt_words, dataset=dataset, seed=args.seed)


async def run_sweep(
    args: argparse.Namespace, state: SweepState, workload: Workload, progress: LiveProgress | None
) -> None:
    """Connect, then run the levels of the chosen mode, appending each to `state`."""
    extra: dict[str, Any] = {"temperature": args.temperature}
    if args.ignore_eos:
        extra["ignore_eos"] = True
    async with OpenAIClient(
        args.url,
        args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        stream=not args.no_stream,
        request_timeout_s=args.request_timeout,
        extra_body=extra,
    ) as client:
        await client.resolve_model()
        metrics_url = args.metrics_url or f"{client.base_url}/metrics"

        async def fetch() -> str | None:
            status, text = await client.get_text(metrics_url)
            return text if status == 200 else None

        watch = MetricsWatch(
            None if args.no_metrics else fetch,
            interval_s=args.poll_interval,
            max_polls=int(args.level_time_limit / max(args.poll_interval, 0.01)) + 100,
        )
        objectives = Objectives(args.slo_ttft_p95, args.slo_itl_p95, args.slo_e2e_p95, args.allow_queueing)
        runner = LevelRunner(
            client,
            workload,
            objectives,
            watch=watch,
            seed=args.seed,
            on_level_start=progress.start_level if progress else None,
            on_request_done=progress.request_done if progress else None,
        )
        if state.mode is Mode.FIND_MAX_BATCH:

            async def evaluate(c: int) -> LevelResult:
                return await runner.run(closed_loop_spec(args, c), state)

            await find_max_batch(evaluate, args.max_concurrency, state)
        elif state.mode is Mode.RATE:
            specs = [LevelSpec(args.requests_per_level, args.level_time_limit, rate_rps=r) for r in args.rate]
            await run_levels(runner, specs, state)
        else:
            levels = args.concurrency or [1, 4, 16]
            await run_levels(runner, [closed_loop_spec(args, c) for c in levels], state)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_loadtest(args: argparse.Namespace) -> int:
    """Run the load test the arguments describe; returns the exit status (130 when interrupted)."""
    console = Console(stderr=True)
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))  # no line per request
    try:
        workload = build_workload(args)
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    state = SweepState(mode=mode_of(args))
    progress = None if args.quiet else LiveProgress(console)
    # `timeout` or `kill` stop the run like Ctrl-C does, so what was measured is still written
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    status = EXIT_OK
    try:
        if progress:
            with progress:
                asyncio.run(run_sweep(args, state, workload, progress))
        else:
            asyncio.run(run_sweep(args, state, workload, progress))
    except KeyboardInterrupt:
        state.interrupted = True
        status = EXIT_INTERRUPTED
    except Exception as exc:
        logger.debug("load test stopped", exc_info=True)
        console.print(f"[red]error:[/red] {exc}")
        status = 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    stdout = Console()
    print_summary(state, stdout if stdout.is_terminal else Console(width=200))
    if args.out is not None:
        for path in write_results(state, config_dict(args), args.out, plots=not args.no_plots):
            logger.info("wrote %s", path)
    return status
