"""GET /v1/models."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from fitserve.server.engine.types import EngineClient
from fitserve.server.openapi import ERROR_RESPONSES
from fitserve.server.protocol.common import now_s
from fitserve.server.protocol.errors import APIError
from fitserve.server.protocol.models import ModelCard, ModelList
from fitserve.server.routes.deps import get_engine

router = APIRouter(tags=["models"], responses=ERROR_RESPONSES)


@router.get("/v1/models", response_model=ModelList)
async def list_models(engine: Annotated[EngineClient, Depends(get_engine)]) -> ModelList:
    """The one served model."""
    return ModelList(data=[_card(engine)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, engine: Annotated[EngineClient, Depends(get_engine)]) -> ModelCard:
    """One model by id; 404 `model_not_found` for any other name."""
    if model_id != engine.model_name:
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return _card(engine)


def _card(engine: EngineClient) -> ModelCard:
    return ModelCard(id=engine.model_name, created=now_s(), max_model_len=engine.max_model_len)
