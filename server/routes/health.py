"""GET /health (liveness), GET /ready (readiness), GET /version. None of these needs an API key."""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from fitserve.server.engine.types import EngineError
from fitserve.server.openapi import ERROR_RESPONSES
from fitserve.server.protocol.errors import APIError
from fitserve.server.routes.deps import ServerState, get_state, not_loaded_error
from fitserve.server.serving.common import engine_error_to_api

router = APIRouter(tags=["health"], responses=ERROR_RESPONSES)


class StatusResponse(BaseModel):
    """Body of /health and /ready."""

    status: str


class VersionResponse(BaseModel):
    """Body of /version."""

    version: str


@router.get("/health", response_model=StatusResponse)
async def health(state: Annotated[ServerState, Depends(get_state)]) -> StatusResponse:
    """200 while the engine loop is alive; 503 when it is missing or dead."""
    if state.engine is None:
        raise not_loaded_error(state)
    try:
        await state.engine.check_health()
    except EngineError as error:
        raise engine_error_to_api(error) from error
    return StatusResponse(status="ok")


@router.get("/ready", response_model=StatusResponse)
async def ready(state: Annotated[ServerState, Depends(get_state)]) -> StatusResponse:
    """200 once the model is loaded and the engine runs; 503 before that and while shutting down."""
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="engine_unavailable")
    if state.engine is None:
        raise not_loaded_error(state)
    if not state.engine.is_ready:
        raise APIError(503, "The model is not ready yet.", code="engine_unavailable")
    return StatusResponse(status="ready")


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    """The fitserve version."""
    return VersionResponse(version=package_version())


def package_version() -> str:
    """The installed fitserve version, or 'unknown' when running from an uninstalled checkout."""
    try:
        return metadata.version("fitserve")
    except metadata.PackageNotFoundError:
        return "unknown"
