"""POST /v1/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fitserve.server.engine.types import EngineClient
from fitserve.server.openapi import STREAM_RESPONSES
from fitserve.server.protocol.completions import CompletionRequest, CompletionResponse
from fitserve.server.routes.deps import ServerState, get_cpu_pool, get_engine, get_state
from fitserve.server.serving.completions import CompletionServing
from fitserve.server.serving.cpu_pool import CPUWorkPool

router = APIRouter(tags=["completions"], responses=STREAM_RESPONSES)


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    engine: Annotated[EngineClient, Depends(get_engine)],
    state: Annotated[ServerState, Depends(get_state)],
    pool: Annotated[CPUWorkPool, Depends(get_cpu_pool)],
) -> Response:
    """OpenAI legacy completions (JSON, or SSE when `stream` is true)."""
    return await CompletionServing(engine, pool, state.settings.max_choices_per_request).create(body, request)
