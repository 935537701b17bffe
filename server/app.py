"""`create_app`: the FastAPI application around an `EngineClient` it is given (or a factory that builds one).

The app never imports torch or transformers, and nothing here knows how an engine is built: `server.serve`
(start-up) passes a factory, tests pass a fake engine. While the factory runs the server already answers. A
watchdog checks the engine loop every `engine_health_interval_s`; a dead loop makes /health fail and calls
`on_fatal_error` (start-up uses it to drain and exit non-zero). Every error leaves as an OpenAI-shaped body:
`{"error": {"message", "type", "param", "code", "request_id"}}`, with no exception text in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from fitserve.server.engine.types import EngineClient, EngineError
from fitserve.server.middleware import RequestGuardMiddleware, error_response
from fitserve.server.openapi import install_openapi
from fitserve.server.protocol.common import UNSUPPORTED_PARAMETER
from fitserve.server.protocol.errors import APIError
from fitserve.server.request_id import REQUEST_ID_HEADER, current_request_id
from fitserve.server.routes import chat, completions, health, models, tokenize
from fitserve.server.routes import metrics as metrics_routes
from fitserve.server.routes.deps import MetricsRenderer, ServerState
from fitserve.server.routes.health import package_version
from fitserve.server.serving.common import engine_error_to_api
from fitserve.server.serving.cpu_pool import CPULanes
from fitserve.server.serving.transport import ClientDisconnectedError
from fitserve.server.settings import Settings

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; nobody receives it


@dataclass
class BuiltEngine:
    """What an engine factory returns: a started engine, its metrics and how to stop it."""

    engine: EngineClient
    metrics: MetricsRenderer | None = None
    close: Callable[[], Awaitable[None]] | None = None


EngineFactory = Callable[[Settings], Awaitable[BuiltEngine]]
FatalCallback = Callable[[BaseException], None]


def create_app(
    settings: Settings,
    engine: EngineClient | None = None,
    metrics: MetricsRenderer | None = None,
    engine_factory: EngineFactory | None = None,
    on_fatal_error: FatalCallback | None = None,
) -> FastAPI:
    """Build the app around `engine`, or around what `engine_factory` builds in the background after start-up.

    While the factory runs, /health and /ready say 503 "loading" and the API 503. The engine the factory built
    is stopped on shutdown. `on_fatal_error` is called once if loading fails or the engine loop dies.
    """
    if engine is None and engine_factory is None:
        raise ValueError("create_app needs an engine or an engine_factory")
    lanes = CPULanes(
        settings.tokenizer_workers,
        settings.tokenizer_max_queued,
        settings.tokenizer_large_body_workers,
        settings.tokenizer_large_body_bytes,
    )
    state = ServerState(settings=settings, cpu_lanes=lanes, engine=engine, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        closers: list[Callable[[], Awaitable[None]]] = []
        tasks: list[asyncio.Task[None]] = []
        if state.engine is None and engine_factory is not None:
            tasks.append(asyncio.create_task(_load_engine(state, engine_factory, closers, on_fatal_error)))
        tasks.append(asyncio.create_task(_watch_engine(state, on_fatal_error)))
        try:
            yield
        finally:
            state.draining = True
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for close in closers:
                await close()
            lanes.close()

    app = FastAPI(title="fitserve", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_openapi(app, lambda: state.engine.model_name if state.engine is not None else None)
    for module in (completions, chat, models, tokenize, health, metrics_routes):
        app.include_router(module.router)
    _add_exception_handlers(app)
    app.add_middleware(
        RequestGuardMiddleware,
        api_key=settings.api_key_value(),
        max_body_bytes=settings.max_body_bytes,
        metrics_require_key=settings.metrics_require_key,
    )
    return app


async def _load_engine(
    state: ServerState,
    factory: EngineFactory,
    closers: list[Callable[[], Awaitable[None]]],
    on_failure: FatalCallback | None,
) -> None:
    """Build the engine and publish it on `state` (runs as a task so the server answers meanwhile)."""
    try:
        built = await factory(state.settings)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        logger.exception("loading the model failed")
        state.load_failed = True
        if on_failure is not None:
            on_failure(error)
        return
    if built.close is not None:
        closers.append(built.close)
    if built.metrics is not None:
        state.metrics = built.metrics
    state.engine = built.engine
    logger.info("model loaded; ready to serve")


async def _watch_engine(state: ServerState, on_failure: FatalCallback | None) -> None:
    """Stop admitting work and report once the engine loop is found dead (it never comes back)."""
    while not state.draining:
        await asyncio.sleep(state.settings.engine_health_interval_s)
        if state.engine is None or state.draining:
            continue
        try:
            await state.engine.check_health()
        except EngineError as error:
            logger.error("the engine loop is dead (%s); draining and stopping the server", error)
            state.draining = True
            if on_failure is not None:
                on_failure(error)
            return


def _add_exception_handlers(app: FastAPI) -> None:
    # Starlette calls each handler only with the exception class it is registered for.
    async def on_api_error(_: Request, error: Exception) -> Response:
        return error_response(cast(APIError, error))

    async def on_engine_error(_: Request, error: Exception) -> Response:
        return error_response(engine_error_to_api(cast(EngineError, error)))

    async def on_validation_error(_: Request, error: Exception) -> Response:
        return error_response(validation_to_api_error(cast(RequestValidationError, error)))

    async def on_http_error(_: Request, error: Exception) -> Response:
        return error_response(http_to_api_error(cast(StarletteHTTPException, error)))

    async def on_disconnect(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def on_unexpected(request: Request, error: Exception) -> Response:
        request_id = current_request_id()
        logger.error(
            "unhandled error on %s %s (request %s)", request.method, request.url.path, request_id, exc_info=error
        )
        body = APIError(500, "Internal server error.", code="internal_error").to_response().model_dump(mode="json")
        return JSONResponse(body, status_code=500, headers={REQUEST_ID_HEADER: request_id or ""})

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnectedError, on_disconnect)
    app.add_exception_handler(Exception, on_unexpected)


def validation_to_api_error(error: RequestValidationError) -> APIError:
    """A pydantic validation failure as a 400 naming the offending parameter."""
    errors = error.errors()
    if not errors:
        return APIError.invalid("invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError.invalid(f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    context = first.get("ctx") or {}
    param = ".".join(loc) or context.get("param")
    if first.get("type") == UNSUPPORTED_PARAMETER:
        return APIError.invalid(str(first.get("msg")), param=param, code=UNSUPPORTED_PARAMETER)
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return APIError.invalid("The request body must be a JSON object sent as Content-Type: application/json.")
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return APIError.invalid(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if param:
        message = f"Invalid value for '{param}': {message}"
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return APIError.invalid(message, param=param)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_union_tag(part: str | int) -> bool:
    """pydantic's name for a union member in an error location (`constrained-str`, `list[int]`), not a field."""
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "-" in part)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def http_to_api_error(error: StarletteHTTPException) -> APIError:
    """Framework HTTP errors (unknown route, wrong method, ...) in OpenAI shape."""
    status = error.status_code
    message = str(error.detail) if error.detail else "error"
    if status == 404 and message == "Not Found":
        message = "Not found: no such route."
    elif status == 405 and message == "Method Not Allowed":
        message = "Method not allowed for this route."
    return APIError(status, message, code=_HTTP_CODES.get(status), headers=dict(error.headers or {}))
