"""POST /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from server.engine.types import EngineClient
from server.protocol.chat import ChatCompletionRequest, ChatCompletionResponse
from server.routes.deps import get_engine
from server.serving.chat import ChatServing

router = APIRouter(tags=["chat"])


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: Annotated[EngineClient, Depends(get_engine)]
) -> Response:
    """OpenAI chat completions (JSON, or SSE when `stream` is true)."""
    return await ChatServing(engine).create(body, request)
