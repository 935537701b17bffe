"""`create_app`: the FastAPI application around an `EngineClient`.

The app never imports torch or transformers. When no engine is given, the lifespan builds one in the
background (default: `server.serve.build_engine`, plan -> load -> Engine) and stops it on shutdown. Every error
leaves as an OpenAI-shaped body: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from fitserve.server.engine.types import EngineClient, EngineError
from fitserve.server.middleware import RequestGuardMiddleware, error_response
from fitserve.server.protocol.errors import APIError
from fitserve.server.routes import chat, completions, health, models, tokenize
from fitserve.server.routes import metrics as metrics_routes
from fitserve.server.routes.deps import ServerState
from fitserve.server.serving.transport import ClientDisconnectedError
from fitserve.server.settings import Settings

logger = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; nobody receives it


@dataclass
class BuiltEngine:
    """What an engine factory returns: a started-able engine and its metrics (either may be reused)."""

    engine: Any
    metrics: Any = None
    close: Callable[[], Awaitable[None]] | None = None


EngineFactory = Callable[[Settings], Awaitable[BuiltEngine]]


FatalCallback = Callable[[BaseException], None]


def create_app(
    settings: Settings,
    engine: EngineClient | None = None,
    metrics: Any = None,
    engine_factory: EngineFactory | None = None,
    on_load_failure: FatalCallback | None = None,
) -> FastAPI:
    """Build the app around `engine`; with `engine=None` the model loads in the background after start-up.

    While it loads the server already answers: /health and /ready say 503 "loading", /v1 routes 503. The engine
    the factory built is stopped on shutdown. If loading fails, /health reports why and `on_load_failure` is
    called (the serve wiring uses it to exit with an error).
    """
    state = ServerState(settings=settings, engine=engine, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        closers: list[Callable[[], Awaitable[None]]] = []
        loading: asyncio.Task[None] | None = None
        if state.engine is None:
            factory = engine_factory or _default_factory()
            loading = asyncio.create_task(_load_engine(state, factory, closers, on_load_failure))
        try:
            yield
        finally:
            state.draining = True
            if loading is not None and not loading.done():
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            for close in closers:
                await close()

    app = FastAPI(title="fitserve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    for module in (completions, chat, models, tokenize, health, metrics_routes):
        app.include_router(module.router)
    _add_exception_handlers(app)
    app.add_middleware(RequestGuardMiddleware, api_key=settings.api_key_value(), max_body_bytes=settings.max_body_bytes)
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
        state.load_error = f"{type(error).__name__}: {error}"
        if on_failure is not None:
            on_failure(error)
        return
    if built.close is not None:
        closers.append(built.close)
    if built.metrics is not None:
        state.metrics = built.metrics
    state.engine = built.engine
    logger.info("model loaded; ready to serve")


def _default_factory() -> EngineFactory:
    from fitserve.server.serve import build_engine  # lazy: pulls in quant, torch and transformers

    return build_engine


def _version() -> str:
    from fitserve.server.routes.health import package_version

    return package_version()


def _add_exception_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, error: APIError) -> Response:
        return error_response(error)

    async def on_engine_error(_: Request, error: EngineError) -> Response:
        return error_response(APIError.from_engine(error))

    async def on_validation_error(_: Request, error: RequestValidationError) -> Response:
        return error_response(validation_to_api_error(error))

    async def on_http_error(_: Request, error: StarletteHTTPException) -> Response:
        return error_response(http_to_api_error(error))

    async def on_disconnect(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def on_unexpected(request: Request, error: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(
            APIError(500, "Internal server error.", code="internal_error").to_response().model_dump(mode="json"),
            status_code=500,
        )

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
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError.invalid(f"The request body is not valid JSON: {detail}".rstrip(": "), code="invalid_json")
    param = ".".join(loc) or None
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
