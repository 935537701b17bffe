"""GET /metrics: whatever the metrics object renders (Prometheus text format)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from starlette.responses import Response

from fitserve.server.protocol.errors import APIError
from fitserve.server.routes.deps import ServerState, get_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(state: Annotated[ServerState, Depends(get_state)]) -> Response:
    """Prometheus exposition; 404 when the server runs without metrics."""
    if state.metrics is None:
        raise APIError(404, "Metrics are not enabled on this server.", code="not_found")
    body, content_type = state.metrics.render()
    return Response(content=body, media_type=content_type)
