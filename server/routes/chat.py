"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from fitserve.server.engine.types import EngineClient
from fitserve.server.openapi import STREAM_RESPONSES
from fitserve.server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from fitserve.server.routes.deps import ServerState, get_cpu_pool, get_engine, get_state
from fitserve.server.serving.chat import ChatServing
from fitserve.server.serving.cpu_pool import CPUWorkPool

router = APIRouter(tags=["chat"], responses=STREAM_RESPONSES)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    engine: Annotated[EngineClient, Depends(get_engine)],
    state: Annotated[ServerState, Depends(get_state)],
    pool: Annotated[CPUWorkPool, Depends(get_cpu_pool)],
) -> Response:
    """OpenAI chat completions (JSON, or SSE when `stream` is true)."""
    return await ChatServing(engine, pool, state.settings.max_choices_per_request).create(body, request)
