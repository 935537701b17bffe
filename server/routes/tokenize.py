"""POST /tokenize and POST /detokenize."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from fitserve.server.engine.types import EngineClient
from fitserve.server.openapi import ERROR_RESPONSES
from fitserve.server.protocol.tokenize import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from fitserve.server.routes.deps import get_cpu_pool, get_engine
from fitserve.server.serving.cpu_pool import CPUWorkPool
from fitserve.server.serving.tokenize import TokenizeServing

router = APIRouter(tags=["tokenize"], responses=ERROR_RESPONSES)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeRequest,
    engine: Annotated[EngineClient, Depends(get_engine)],
    pool: Annotated[CPUWorkPool, Depends(get_cpu_pool)],
) -> TokenizeResponse:
    """Text or chat messages to token ids."""
    return await TokenizeServing(engine, pool).tokenize(body)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest,
    engine: Annotated[EngineClient, Depends(get_engine)],
    pool: Annotated[CPUWorkPool, Depends(get_cpu_pool)],
) -> DetokenizeResponse:
    """Token ids to text."""
    return await TokenizeServing(engine, pool).detokenize(body)
