"""FastAPI dependencies shared by the routers: the server state and the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from fitserve.server.engine.types import EngineClient
from fitserve.server.protocol.errors import APIError
from fitserve.server.serving.cpu_pool import CPULanes, CPUWorkPool
from fitserve.server.settings import Settings


class MetricsRenderer(Protocol):
    """What /metrics serves: the exposition body and its content type."""

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format."""
        ...


@dataclass
class ServerState:
    """Per-app state, stored on `app.state.server`; `draining` is set when shutdown begins."""

    settings: Settings
    cpu_lanes: CPULanes
    engine: EngineClient | None = None
    metrics: MetricsRenderer | None = None
    draining: bool = False
    load_failed: bool = False  # the model failed to load (the log says why)


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


def get_cpu_pool(request: Request) -> CPUWorkPool:
    """The bounded pool that tokenises and detokenises this request off the event loop: the large-body lane for a
    body over `--tokenizer-large-body-bytes` or of unknown length, the ordinary one otherwise."""
    return get_state(request).cpu_lanes.for_body(_content_length(request))


def _content_length(request: Request) -> int | None:
    """The body's declared length, or None (chunked, or a malformed header)."""
    header = request.headers.get("content-length")
    return int(header) if header is not None and header.isdigit() else None


def not_loaded_error(state: ServerState) -> APIError:
    """503 while the model loads, or after it failed to load."""
    if state.load_failed:
        return APIError(503, "The model failed to load; the server log says why.", code="engine_unavailable")
    return APIError(503, "The model is still loading.", code="engine_unavailable")
