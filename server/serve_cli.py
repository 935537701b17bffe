"""The `fitserve serve` subcommand: flags -> `Settings` (flags override FITSERVE_* env) -> `server.serve.run`."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Callable

from pydantic import ValidationError

from fitserve.quant.plan_flags import add_plan_flags
from fitserve.server.engine.compile_mode import CompileMode
from fitserve.server.settings import Settings

logger = logging.getLogger(__name__)

# Flags whose destination differs from their Settings field.
_RENAMED = {"serve_log_level": "log_level"}
# Flags that choose the Ray Serve scale-out instead of a single process (not Settings fields).
_SCALE_OUT_FLAGS = ("replicas", "max_replicas", "ray_address", "replica_budgets", "replica_max_kv_tokens")


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `serve` to the top-level parser. Unset flags stay absent so env vars and defaults apply."""
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Plan the precision that fits the memory budget, load the model and serve it.",
        argument_default=argparse.SUPPRESS,
    )
    plan = parser.add_argument_group("model and memory plan (as `fitserve plan`)")
    add_plan_flags(plan, with_defaults=False)
    plan.add_argument("--served-model-name", help="name clients send as `model` (default: the model dir name)")
    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-batch-size",
        type=int,
        help="most sequences decoded per step (default: as many as the plan's KV cache admits, at most 64)",
    )
    engine.add_argument(
        "--compile-mode",
        choices=[m.value for m in CompileMode],
        help="decode step: auto (default: CUDA graphs on GPU; on CPU batch-1 steps compiled for int8/int4 when the "
        "budget has room, else off), off (eager), eager (fixed-shape, not compiled), inductor (torch.compile, every "
        "batch size), cuda-graphs",
    )
    engine.add_argument(
        "--no-compile",
        dest="compile_mode",
        action="store_const",
        const=CompileMode.OFF.value,
        help="same as --compile-mode off",
    )
    engine.add_argument("--max-waiting", type=int, help="queued requests beyond which new ones get 429 (256)")
    engine.add_argument(
        "--max-choices-per-request", type=int, help="most choices (prompts x n) one request may ask for (64)"
    )
    engine.add_argument("--max-prefill-tokens", type=int, help="prompt tokens computed per step")
    engine.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="compute every prompt in full instead of reusing cached KV blocks of a shared prefix",
    )
    engine.add_argument(
        "--oom-inject-steps", help="fault injection: comma-separated engine steps that raise OOM (off by default)"
    )
    engine.add_argument(
        "--crash-inject-step", type=int, help="fault injection: the engine step at which the engine loop dies"
    )
    engine.add_argument(
        "--tokenizer-workers", type=int, help="threads that tokenize and detokenize requests off the event loop (2)"
    )
    engine.add_argument(
        "--tokenizer-max-queued", type=int, help="requests waiting for a tokenizer thread beyond which new get 429 (64)"
    )
    engine.add_argument(
        "--tokenizer-large-body-bytes",
        type=int,
        help="bodies above this are tokenized on their own lane, never delaying small requests (65536)",
    )
    engine.add_argument("--tokenizer-large-body-workers", type=int, help="threads of the large-body tokenizer lane (1)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", help="bind address (default 127.0.0.1)")
    http.add_argument("--port", type=int, help="port (default 8000)")
    http.add_argument(
        "--api-key", help="require 'Authorization: Bearer <key>' on every route but /health, /ready, /version, /metrics"
    )
    http.add_argument(
        "--metrics-require-key", action="store_true", help="with --api-key: /metrics needs the key too (default: open)"
    )
    http.add_argument("--max-body-bytes", type=int, help="request bodies above this get 413 (default 1 MiB)")
    http.add_argument(
        "--shutdown-timeout",
        dest="shutdown_timeout_s",
        type=float,
        metavar="SECONDS",
        help="seconds to drain requests on SIGTERM or after the engine died (default 30)",
    )
    http.add_argument("--log-level", dest="serve_log_level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...")
    scale = parser.add_argument_group("scale-out (Ray Serve; needs the `ray` extra)")
    scale.add_argument("--replicas", type=int, help="serve N engine replicas behind this port through Ray Serve")
    scale.add_argument(
        "--max-replicas", type=int, help="autoscale between --replicas and this on KV usage and waiting requests"
    )
    scale.add_argument("--ray-address", help="deploy to this Ray cluster (default: start a local, loopback-only one)")
    scale.add_argument(
        "--replica-budgets",
        type=_comma_list(str),
        help="memory budget per replica by Serve rank, e.g. 600MiB,1.2GiB (each plans within its own; wraps around)",
    )
    scale.add_argument(
        "--replica-max-kv-tokens", type=_comma_list(int), help="KV cache cap per replica by rank, e.g. 1024,3072"
    )
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with every explicitly given flag overriding the environment."""
    overrides = {
        _RENAMED.get(key, key): value
        for key, value in vars(args).items()
        if key not in ("func", "command", "log_level", *_SCALE_OUT_FLAGS)
    }
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of `fitserve serve`; returns the exit status."""
    from fitserve.server.serve import EXIT_CANNOT_LOAD, run

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        logger.error("invalid serve settings:\n%s", error)
        return EXIT_CANNOT_LOAD
    scale_out = {flag: getattr(args, flag, None) for flag in _SCALE_OUT_FLAGS}
    if any(value is not None for value in scale_out.values()):
        return _run_scale_out(settings, **scale_out)
    return run(settings)


def _run_scale_out(
    settings: Settings,
    replicas: int | None,
    max_replicas: int | None,
    ray_address: str | None,
    replica_budgets: list[str] | None,
    replica_max_kv_tokens: list[int] | None,
) -> int:
    """`--replicas` / `--ray-address`: the Ray Serve application (lazy import: ray is an optional extra)."""
    from fitserve.server.serve import EXIT_CANNOT_LOAD

    per_replica = max(len(replica_budgets or ()), len(replica_max_kv_tokens or ()))
    replicas = replicas or max(per_replica, 1)
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        logger.error("--replicas must be at least 1 and --max-replicas at least --replicas")
        return EXIT_CANNOT_LOAD
    if importlib.util.find_spec("ray") is None:  # find, not import: Ray reads its environment on import
        logger.error("--replicas needs Ray Serve: pip install 'fitserve[ray]'")
        return EXIT_CANNOT_LOAD
    from fitserve.server.scaleout.launch import replica_overrides, run_replicas

    try:
        overrides = replica_overrides(replica_budgets, replica_max_kv_tokens)
    except ValueError as error:
        logger.error("%s", error)
        return EXIT_CANNOT_LOAD
    return run_replicas(settings, replicas, ray_address, max_replicas, overrides)


def _comma_list(item: type) -> Callable[[str], list]:
    """An argparse type for `a,b,c` lists of `item`."""

    def parse(text: str) -> list:
        try:
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse
