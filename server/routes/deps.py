"""FastAPI dependencies shared by the routers: the server state and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from server.engine.types import EngineClient
from server.protocol.errors import APIError
from server.settings import Settings


@dataclass
class ServerState:
    """Per-app state, stored on `app.state.server`; `draining` is set when shutdown begins."""

    settings: Settings
    engine: EngineClient | None = None
    metrics: Any = None  # anything with render() -> (body bytes, content type)
    draining: bool = False


def get_state(request: Request) -> ServerState:
    """The app's `ServerState`."""
    return request.app.state.server


def get_engine(request: Request) -> EngineClient:
    """The engine, or 503 while it is loading or the server is shutting down."""
    state = get_state(request)
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="engine_unavailable")
    if state.engine is None:
        raise APIError(503, "The model is still loading.", code="engine_unavailable")
    return state.engine
