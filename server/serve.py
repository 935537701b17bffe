"""`fitserve serve` start-up: settings -> plan -> load -> engine -> threads -> malloc trim -> app -> uvicorn.

The top of `server/`: nothing imports this module but the CLI, and it is the only one that imports `quant` and
`server.engine.engine` (lazily, at start-up). Planning runs before uvicorn starts, so a model that does not fit
(or does not exist) ends the command with a clear message and exit status 2. Loading then runs in the background
while the server already answers (/ready 503 until the engine runs). SIGTERM/SIGINT: the app stops admitting
work (503, /ready 503), uvicorn waits up to `shutdown_timeout_s` for running requests, then the engine stops and
the process exits 0. A load failure, or an engine loop found dead, drains the same way and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import uvicorn

from fitserve.quant.heap import use_one_heap_arena
from fitserve.server.app import BuiltEngine, create_app
from fitserve.server.engine.compile_mode import (
    CompileChoice,
    CompileMode,
    CpuLinearKernels,
    choose_cpu_compile,
    compile_runtime_bytes,
)
from fitserve.server.routes.deps import ServerState
from fitserve.server.settings import Settings

if TYPE_CHECKING:
    from rich.console import RenderableType

    from fitserve.quant.load import LoadedModel
    from fitserve.quant.plan import Plan
    from fitserve.quant.schemes import KernelBackend, Precision
    from fitserve.server.engine.config import EngineConfig
    from fitserve.server.engine.engine import Engine
    from fitserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_CANNOT_LOAD = 2
MAX_DEFAULT_BATCH_SIZE = 64  # default batch cap ceiling (see default_max_batch_size)


@dataclass
class PlannedServing:
    """The resolved model and the memory plan for it."""

    model_dir: Path
    served_model_name: str
    plan: Plan
    compile: CompileChoice = field(default_factory=lambda: CompileChoice(CompileMode.AUTO))  # the decode step's mode


@dataclass
class LoadedServing:
    """A planned model, loaded."""

    planned: PlannedServing
    loaded: LoadedModel


@dataclass
class StartedEngine:
    """A running engine, its metrics and how to stop it (what `fitserve serve` and a Ray replica start)."""

    engine: Engine
    metrics: ServerMetrics
    close: Callable[[], Awaitable[None]]

    def for_app(self) -> BuiltEngine:
        """The same, as the app's engine factory hands it over."""
        return BuiltEngine(engine=self.engine, metrics=self.metrics, close=self.close)


async def run_in_short_lived_thread(fn: Callable[..., T], *args: Any) -> T:
    """`await fn(*args)` run in a new thread that ends when `fn` returns (not a pooled executor thread).

    Why not `asyncio.to_thread`: GNU OpenMP keeps a team of worker threads for every thread that ran a parallel
    torch op, for as long as that thread lives. An executor thread that loaded the model lives on, and with more
    OpenMP threads than cores libgomp stops spinning between parallel regions, so every op of the engine thread
    pays a futex sleep and wake-up: measured 30-50% slower forwards at 4-16 tokens on 2 cores. A thread that
    exits releases its team, and the engine thread stays the only one running torch.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only alongside an error

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


def decode_compile_choice(plan: Plan, requested: CompileMode) -> CompileChoice:
    """The decode-step compile choice for `plan`: on CPU, AUTO is decided here, with the precision and the spare
    known (`choose_cpu_compile`); on a GPU the runner resolves AUTO (CUDA graphs), and a capture that fails at
    start-up then serves eagerly."""
    if plan.device != "cpu" or plan.precision is None:
        return CompileChoice(requested, fallback_to_eager=requested is CompileMode.AUTO)
    from fitserve.server.engine.compiled_decode import cpu_compiler_available
    from fitserve.server.engine.cpu_linear import cpu_linear_kernels

    kernels = cpu_linear_kernels(plan.precision, plan.quant_backend)
    compiler = kernels is not CpuLinearKernels.OTHER and requested is CompileMode.AUTO and cpu_compiler_available()
    return choose_cpu_compile(requested, kernels, plan.spare_bytes, compiler, dense_weight_bytes=plan.weights_bytes)


def compile_config_fields(choice: CompileChoice) -> dict[str, Any]:
    """The `EngineConfig` fields a compile choice sets (the packer's allowance for its copies is the caller's)."""
    fields: dict[str, Any] = {"compile_mode": choice.mode}
    if choice.max_compiled_batch_size is not None:
        fields["max_compiled_batch_size"] = choice.max_compiled_batch_size
    if choice.fallback_to_eager:
        fields["compile_fallback_to_eager"] = True
    if choice.dense_copy_bytes:  # the plan counted packed copies beside the dense weights the step reads
        fields["keep_dense_cpu_linears"] = True
    return fields


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
            compiling = compile_runtime_bytes(settings.compile_mode, on_cpu=True)  # inductor's state, when asked for
            options["cpu_runtime_bytes"] = measure_cpu_runtime_bytes() + compiling
        plan = make_plan(PlanRequest(model=model_dir, **options))
    except (ModelNotFoundError, FetchError, NothingFitsError, ValueError) as error:
        raise StartupError(str(error)) from error
    compile_choice = decode_compile_choice(plan, settings.compile_mode)
    if plan.device == "cpu" and plan.precision is not None:
        plan = plan.with_runtime_bytes(compile_choice.runtime_bytes, compile_choice.reason)
    logger.info("memory plan for %s:\n%s", model_dir, render_table(plan.to_table()))
    name = settings.served_model_name or Path(model_dir).name
    return PlannedServing(model_dir=Path(model_dir), served_model_name=name, plan=plan, compile=compile_choice)


def load_serving(planned: PlannedServing, settings: Settings) -> LoadedServing:
    """Load the planned model (blocking; seconds to minutes)."""
    from fitserve.quant.load import load_model

    loaded = load_model(planned.plan, trust_remote_code=settings.trust_remote_code)
    logger.info("load report:\n%s", render_table(loaded.report.to_table()))
    return LoadedServing(planned, loaded)


def plan_options(settings: Settings, budget_bytes: int | None) -> dict[str, Any]:
    """PlanRequest fields from the settings; unset options keep the planner's defaults."""
    options: dict[str, Any] = {
        "memory_budget_bytes": budget_bytes,
        "min_concurrency": settings.min_concurrency,
        "precision": settings.precision,
        "force": settings.force,
        "prefer_fp32_on_cpu": settings.prefer_fp32_on_cpu,
        "quant_backend": settings.quant_backend,
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


def render_table(table: RenderableType) -> str:
    """The text of a rich table, for the log."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=120, color_system=None).print(table)
    return buffer.getvalue().rstrip()


def engine_config(serving: LoadedServing, settings: Settings) -> EngineConfig:
    """The engine's configuration from the plan (block-aligned KV capacity, spare bytes) and the settings."""
    from fitserve.server.engine.config import EngineConfig

    plan = serving.planned.plan
    config_kwargs: dict[str, Any] = {}
    if settings.max_prefill_tokens is not None:
        config_kwargs["max_prefill_tokens"] = settings.max_prefill_tokens
    compile_choice = serving.planned.compile
    config_kwargs |= compile_config_fields(compile_choice)
    return EngineConfig(
        served_model_name=serving.planned.served_model_name,
        max_model_len=plan.max_model_len,
        kv_capacity_tokens=plan.kv_capacity_tokens,
        block_size_tokens=plan.block_size_tokens,
        # may hold a prepacked copy of a tied lm_head on CPU; plus the copies the compile choice planned
        spare_bytes=plan.spare_bytes + compile_choice.dense_copy_bytes,
        attention_scratch_bytes=plan.attention_scratch_bytes,  # bounds the batched decode attention's gather
        max_batch_size=settings.max_batch_size
        or default_max_batch_size(plan.kv_capacity_tokens, plan.block_size_tokens),
        max_waiting=settings.max_waiting,
        enable_prefix_caching=settings.enable_prefix_caching,
        oom_inject_steps=settings.oom_inject_steps,
        crash_inject_step=settings.crash_inject_step,
        device=plan.device,
        **config_kwargs,
    )


async def start_engine(serving: LoadedServing, settings: Settings) -> StartedEngine:
    """Build metrics and the engine around a loaded model, start the engine loop."""
    from fitserve.quant.load import release_free_heap
    from fitserve.server.engine.engine import Engine
    from fitserve.server.ledger import LoadReportLike, ModelInfo, PlanLike, make_ledger_fn
    from fitserve.server.metrics import ServerMetrics

    plan, loaded = serving.planned.plan, serving.loaded
    if plan.precision is None:  # only a NothingFitsError's plan has none, and that never gets here
        raise StartupError("the plan chose no precision")
    metrics = ServerMetrics(
        model_info=ModelInfo(
            model=serving.planned.served_model_name,
            precision=plan.precision.value,
            quant_method=_quant_method(plan.precision, plan.quant_backend),
            dtype=plan.kv_dtype.removeprefix("torch."),
            device=plan.device,
        )
    )
    config = engine_config(serving, settings)
    use_compile_cache()
    # built off the event loop's thread (the KV cache allocation and weight prepacking are parallel torch ops)
    engine = await run_in_short_lived_thread(lambda: Engine(loaded.model, loaded.tokenizer, config, stats_sink=metrics))
    if plan.device == "cpu":  # the weights prepacking replaced sit in malloc's free lists; give them back to the OS
        release_free_heap()
    await engine.start()
    metrics.attach_snapshot(engine.snapshot)
    try:
        # the ledger's protocols declare settable attributes; the frozen Plan and LoadReport only read them
        ledger_plan, ledger_report = cast("PlanLike", plan), cast("LoadReportLike", loaded.report)
        metrics.attach_ledger(make_ledger_fn(ledger_plan, ledger_report, plan.device))
    except Exception:
        logger.warning("memory ledger unavailable", exc_info=True)

    async def stop() -> None:
        logger.info("stopping the engine (timeout %.1fs)", settings.shutdown_timeout_s)
        await engine.stop(settings.shutdown_timeout_s)

    logger.info(
        "engine started: model=%s max_model_len=%d kv_capacity_tokens=%d max_batch_size=%s max_waiting=%d "
        "prefix_caching=%s compile_mode=%s (decode step: %s)",
        config.served_model_name,
        config.max_model_len,
        config.kv_capacity_tokens,
        config.max_batch_size,
        config.max_waiting,
        config.enable_prefix_caching,
        settings.compile_mode.value,
        engine.runner.compile_mode.value,
    )
    return StartedEngine(engine=engine, metrics=metrics, close=stop)


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


def _quant_method(precision: Precision, backend: KernelBackend | None) -> str:
    """The `quant_method` label for a precision: its kernel backend (torch, bitsandbytes), gptq or none."""
    if precision.value in ("int8", "int4", "nf4"):
        return backend.value if backend is not None else "bitsandbytes"
    return "gptq" if precision.value == "gptq" else "none"


def run(settings: Settings) -> int:
    """Plan, then serve until SIGTERM/SIGINT while the model loads in the background; returns the exit status.

    0 after a requested shutdown, 1 when loading failed or the engine loop died (after draining), 2 when the
    model cannot be planned.
    """
    if settings.log_level is not None:
        logging.getLogger().setLevel(settings.log_level.value)
    use_one_heap_arena()  # before any thread allocates: freed memory can then be trimmed (quant/heap.py)
    try:
        planned = plan_serving(settings)
    except StartupError as error:
        logger.error("cannot serve: %s", error)
        return EXIT_CANNOT_LOAD

    async def factory(app_settings: Settings) -> BuiltEngine:
        loaded = await run_in_short_lived_thread(load_serving, planned, app_settings)
        return (await start_engine(loaded, app_settings)).for_app()

    failures: list[BaseException] = []

    def on_fatal_error(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True  # uvicorn drains for up to shutdown_timeout_s, then the lifespan stops the engine

    app = create_app(settings, engine_factory=factory, on_fatal_error=on_fatal_error)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the CLI's logging configuration
        access_log=logging.getLogger().isEnabledFor(logging.DEBUG),
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout_s),  # uvicorn's type says int
        lifespan="on",
    )
    server = _DrainingServer(config, app.state.server)
    logger.info(
        "serving %s on http://%s:%d (loading the model)", planned.served_model_name, settings.host, settings.port
    )
    server.run()
    if failures:
        logger.error("stopped after a fatal error: %s", failures[0])
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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Stop admitting new requests, then let uvicorn drain the running ones."""
        if not self._state.draining:
            logger.info("shutdown signal %s: no longer admitting requests", sig)
        self._state.draining = True
        super().handle_exit(sig, frame)
