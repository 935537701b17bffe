"""`fitserve serve` wiring: settings -> plan -> load -> Engine -> ServerMetrics -> app -> uvicorn.

The only module of `server/` that imports `quant` and `server.engine.engine`, lazily, at start-up. Planning
runs before uvicorn starts, so a model that does not fit (or does not exist) ends the command with a clear
message and exit status 2. Loading then runs in the background while the server already answers (/ready 503
until the engine runs); a load failure stops the server with exit status 1. SIGTERM/SIGINT: the app stops
admitting work (503, /ready 503), uvicorn waits up to `shutdown_timeout_s` for running requests, then the
engine stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from fitserve.server.app import BuiltEngine, create_app
from fitserve.server.routes.deps import ServerState
from fitserve.server.settings import Settings

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_CANNOT_LOAD = 2
MAX_DEFAULT_BATCH_SIZE = 64  # default batch cap ceiling (see default_max_batch_size)


@dataclass
class PlannedServing:
    """The resolved model and the memory plan for it."""

    model_dir: Path
    served_model_name: str
    plan: Any  # fitserve.quant.plan.Plan


@dataclass
class LoadedServing(PlannedServing):
    """A planned model, loaded."""

    loaded: Any = None  # fitserve.quant.load.LoadedModel


async def run_in_short_lived_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`await fn(*args)` run in a new thread that ends when `fn` returns (not a pooled executor thread).

    Why not `asyncio.to_thread`: GNU OpenMP keeps a team of worker threads for every thread that ran a parallel
    torch op, for as long as that thread lives. An executor thread that loaded the model lives on, and with more
    OpenMP threads than cores libgomp stops spinning between parallel regions, so every op of the engine thread
    pays a futex sleep and wake-up: measured 30-50% slower forwards at 4-16 tokens on 2 cores. A thread that
    exits releases its team, and the engine thread stays the only one running torch.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    thread = threading.Thread(target=target, name=f"fitserve-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    result = await future
    thread.join(timeout=5.0)  # it has nothing left to do but exit
    return result


class StartupError(Exception):
    """The model cannot be planned; the message says why."""


def plan_serving(settings: Settings) -> PlannedServing:
    """Resolve the model and plan its precision within the budget (fast; raises StartupError)."""
    from fitserve.quant.budget import nvidia_driver_present, parse_size
    from fitserve.quant.load import measure_cpu_runtime_bytes
    from fitserve.quant.model_store import FetchError, ModelNotFoundError, resolve_model
    from fitserve.quant.plan import NothingFitsError, PlanRequest, make_plan

    try:
        model_dir = resolve_model(settings.model)
        budget_bytes = parse_size(settings.memory_budget) if settings.memory_budget else None
        options = plan_options(settings, budget_bytes)
        if not nvidia_driver_present():  # CPU: plan with what this process really holds, not an estimate
            options["cpu_runtime_bytes"] = measure_cpu_runtime_bytes()
        plan = make_plan(PlanRequest(model=model_dir, **options))
    except (ModelNotFoundError, FetchError, NothingFitsError, ValueError) as error:
        raise StartupError(str(error)) from error
    logger.info("memory plan for %s:\n%s", model_dir, format_plan(plan))
    name = settings.served_model_name or Path(model_dir).name
    return PlannedServing(model_dir=Path(model_dir), served_model_name=name, plan=plan)


def load_serving(planned: PlannedServing, settings: Settings) -> LoadedServing:
    """Load the planned model (blocking; seconds to minutes)."""
    from fitserve.quant.load import load_model

    loaded = _load(load_model, planned.plan, settings)
    logger.info("load report:\n%s", render_table(loaded.report))
    return LoadedServing(planned.model_dir, planned.served_model_name, planned.plan, loaded)


def plan_and_load(settings: Settings) -> LoadedServing:
    """Plan, then load (blocking)."""
    return load_serving(plan_serving(settings), settings)


def plan_options(settings: Settings, budget_bytes: int | None) -> dict[str, Any]:
    """PlanRequest fields from the settings; unset options keep the planner's defaults."""
    options: dict[str, Any] = {
        "memory_budget_bytes": budget_bytes,
        "min_concurrency": settings.min_concurrency,
        "precision": settings.precision,
        "force": settings.force,
        "prefer_fp32_on_cpu": settings.prefer_fp32_on_cpu,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.max_batch_size is not None:  # else the planner sizes the KV cache for its default sequence count
        options["max_num_seqs"] = settings.max_batch_size
    if settings.max_model_len is not None:
        options["max_model_len"] = settings.max_model_len
    if settings.max_kv_tokens is not None:
        options["max_kv_tokens"] = settings.max_kv_tokens
    if settings.max_prefill_tokens is not None:
        options["max_batch_tokens"] = settings.max_prefill_tokens + (settings.max_batch_size or MAX_DEFAULT_BATCH_SIZE)
    return options


def _load(load_model: Callable[..., Any], plan: Any, settings: Settings) -> Any:
    """Call quant's loader with the user's trust_remote_code choice."""
    return load_model(plan, trust_remote_code=settings.trust_remote_code)


def render_table(obj: Any) -> str:
    """Text of `obj.to_table()` (a rich table) when it has one, else `str(obj)`."""
    to_table = getattr(obj, "to_table", None)
    if not callable(to_table):
        return str(obj)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(to_table())
    return console.file.getvalue().rstrip()  # type: ignore[attr-defined]


def format_plan(plan: Any) -> str:
    """The plan as a small table: the decision, then one line per candidate precision."""
    if callable(getattr(plan, "to_table", None)):
        return render_table(plan)
    rows = [
        ("precision", _value(getattr(plan, "precision", "?"))),
        ("device", getattr(plan, "device", "?")),
        ("budget_bytes", getattr(plan, "budget_bytes", "?")),
        ("weights_bytes", getattr(plan, "weights_bytes", "?")),
        ("overhead_bytes", getattr(plan, "overhead_bytes", "?")),
        ("kv_bytes_per_token", getattr(plan, "kv_bytes_per_token", "?")),
        ("kv_capacity_tokens", getattr(plan, "kv_capacity_tokens", "?")),
        ("max_model_len", getattr(plan, "max_model_len", "?")),
        ("reason", getattr(plan, "reason", "")),
    ]
    width = max(len(key) for key, _ in rows)
    lines = [f"  {key.ljust(width)}  {value}" for key, value in rows]
    for candidate in getattr(plan, "candidates", None) or ():
        lines.append(
            f"  candidate {_value(getattr(candidate, 'precision', '?')):>5}: "
            f"total {getattr(candidate, 'total_bytes', '?')} bytes, fits={getattr(candidate, 'fits', '?')}, "
            f"kv_capacity_tokens={getattr(candidate, 'kv_capacity_tokens', '?')}"
        )
    return "\n".join(lines)


def _value(obj: Any) -> Any:
    return getattr(obj, "value", obj)


async def start_engine(serving: LoadedServing, settings: Settings) -> BuiltEngine:
    """Build metrics and the engine around a loaded model, start the engine loop."""
    from fitserve.quant.load import release_free_heap
    from fitserve.server.engine.config import EngineConfig
    from fitserve.server.engine.engine import Engine
    from fitserve.server.ledger import ModelInfo, make_ledger_fn
    from fitserve.server.metrics import ServerMetrics

    plan, loaded = serving.plan, serving.loaded
    device = str(getattr(plan, "device", "cpu"))
    report = loaded.report
    metrics = ServerMetrics(
        model_info=ModelInfo(
            model=serving.served_model_name,
            precision=str(getattr(plan.precision, "value", plan.precision)),
            quant_method=_quant_method(plan.precision),
            dtype=str(getattr(plan, "kv_dtype", "unknown")).removeprefix("torch."),
            device=device,
        )
    )
    config_kwargs: dict[str, Any] = {}
    if settings.max_prefill_tokens is not None:
        config_kwargs["max_prefill_tokens"] = settings.max_prefill_tokens
    use_compile_cache()
    config = EngineConfig(
        served_model_name=serving.served_model_name,
        max_model_len=int(plan.max_model_len),
        kv_capacity_tokens=int(plan.kv_capacity_tokens),
        block_size_tokens=int(plan.block_size_tokens),
        spare_bytes=int(plan.spare_bytes),  # may hold a prepacked copy of a tied lm_head on CPU
        max_batch_size=settings.max_batch_size
        or default_max_batch_size(int(plan.kv_capacity_tokens), int(plan.block_size_tokens)),
        max_waiting=settings.max_waiting,
        compile_mode=settings.compile_mode,
        enable_prefix_caching=settings.enable_prefix_caching,
        oom_inject_steps=settings.oom_inject_steps,
        device=device,
        **config_kwargs,
    )
    # built off the event loop's thread (the KV cache allocation and weight prepacking are parallel torch ops)
    engine = await run_in_short_lived_thread(lambda: Engine(loaded.model, loaded.tokenizer, config, stats_sink=metrics))
    if device == "cpu":  # the weights prepacking replaced sit in malloc's free lists; give them back to the OS
        release_free_heap()
    await engine.start()
    metrics.attach_snapshot(engine.snapshot)
    try:
        metrics.attach_ledger(make_ledger_fn(plan, report, device))
    except Exception:
        logger.warning("memory ledger unavailable", exc_info=True)

    async def stop() -> None:
        logger.info("stopping the engine (timeout %.1fs)", settings.shutdown_timeout_s)
        await engine.stop(settings.shutdown_timeout_s)

    logger.info(
        "engine started: model=%s max_model_len=%d kv_capacity_tokens=%d max_batch_size=%s max_waiting=%d "
        "prefix_caching=%s compile_mode=%s (decode step: %s)",
        serving.served_model_name,
        config.max_model_len,
        config.kv_capacity_tokens,
        config.max_batch_size,
        config.max_waiting,
        config.enable_prefix_caching,
        config.compile_mode.value,
        engine.runner.compile_mode.value,
    )
    return BuiltEngine(engine=engine, metrics=metrics, close=stop)


def use_compile_cache(environ: dict[str, str] | None = None) -> Path:
    """Point torch.compile's caches (inductor's FX graph / kernel cache, Triton's under it) at
    `$FITSERVE_HOME/compile` unless TORCHINDUCTOR_CACHE_DIR is set: a warm cache survives restarts there."""
    import os

    from fitserve.quant.model_store import fitserve_home

    env = os.environ if environ is None else environ
    return Path(env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(fitserve_home() / "compile")))


def default_max_batch_size(kv_capacity_tokens: int, block_size_tokens: int) -> int:
    """The batch cap without `--max-batch-size`: as many sequences as the plan's KV cache admits (a block each at
    least), at most `MAX_DEFAULT_BATCH_SIZE` (the largest decode bucket compiled at start-up)."""
    return max(1, min(MAX_DEFAULT_BATCH_SIZE, kv_capacity_tokens // block_size_tokens))


def _quant_method(precision: Any) -> str:
    """The `quant_method` label for a precision."""
    name = str(_value(precision))
    if name in ("int8", "nf4"):
        return "bitsandbytes"
    return "gptq" if name == "gptq" else "none"


async def build_engine(settings: Settings) -> BuiltEngine:
    """Plan, load (in a worker thread) and start: the app's default engine factory."""
    serving = await run_in_short_lived_thread(plan_and_load, settings)
    return await start_engine(serving, settings)


def run(settings: Settings) -> int:
    """Plan, then serve until SIGTERM/SIGINT while the model loads in the background; returns the exit status."""
    if settings.log_level is not None:
        logging.getLogger().setLevel(settings.log_level.value)
    try:
        planned = plan_serving(settings)
    except StartupError as error:
        logger.error("cannot serve: %s", error)
        return EXIT_CANNOT_LOAD

    async def factory(app_settings: Settings) -> BuiltEngine:
        loaded = await run_in_short_lived_thread(load_serving, planned, app_settings)
        return await start_engine(loaded, app_settings)

    failures: list[BaseException] = []

    def on_load_failure(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(settings, engine_factory=factory, on_load_failure=on_load_failure)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's logging configuration
        access_log=logging.getLogger().isEnabledFor(logging.DEBUG),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.server)
    logger.info(
        "serving %s on http://%s:%d (loading the model)", planned.served_model_name, settings.host, settings.port
    )
    server.run()
    if failures:
        logger.error("stopped: the model failed to load (%s)", failures[0])
        return EXIT_RUNTIME_ERROR
    if not server.started:
        return EXIT_RUNTIME_ERROR
    logger.info("server stopped")
    return EXIT_OK


class _DrainingServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining as soon as a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM as a graceful shutdown and exit normally afterwards.

        uvicorn re-raises the captured signal once it has shut down, which would end the process "killed by
        SIGTERM"; a drained, clean shutdown should exit 0 instead.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Stop admitting new requests, then let uvicorn drain the running ones."""
        if not self._state.draining:
            logger.info("shutdown signal %s: no longer admitting requests", sig)
        self._state.draining = True
        super().handle_exit(sig, frame)
