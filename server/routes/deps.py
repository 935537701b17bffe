"""FastAPI dependencies shared by the routers: the server state and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from fitserve.server.engine.types import EngineClient
from fitserve.server.protocol.errors import APIError
from fitserve.server.settings import Settings


@dataclass
class ServerState:
    """Per-app state, stored on `app.state.server`; `draining` is set when shutdown begins."""

    settings: Settings
    engine: EngineClient | None = None
    metrics: Any = None  # anything with render() -> (body bytes, content type)
    draining: bool = False
    load_error: str | None = None  # why the model failed to load, if it did


def get_state(request: Request) -> ServerState:
    """The app's `ServerState`."""
    return request.app.state.server


def get_engine(request: Request) -> EngineClient:
    """The engine, or 503 while it is loading or the server is shutting down."""
    state = get_state(request)
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="engine_unavailable")
    if state.engine is None:
        raise not_loaded_error(state)
    return state.engine


def not_loaded_error(state: ServerState) -> APIError:
    """503 while the model loads, or after it failed to load."""
    if state.load_error is not None:
        return APIError(503, f"The model failed to load: {state.load_error}", code="engine_unavailable")
    return APIError(503, "The model is still loading.", code="engine_unavailable")
