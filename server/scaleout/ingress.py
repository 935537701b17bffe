"""The ingress deployment: fitserve's own FastAPI app (same routes, errors, SSE and auth as `fitserve serve`)
around a `ReplicaEngineClient`, plus `GET /metrics/targets` (Prometheus http_sd: one target per replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse

from fitserve.server.scaleout.config import DIRECTORY_NAMESPACE, ScaleoutConfig

logger = logging.getLogger(__name__)

DECISIONS_REFRESH_S = 2.0


class Ingress:
    """Builds the app once the engine replicas answer; Serve wraps it (`serve.ingress()`, late-bound app)."""

    async def __init__(self, engine_handle: Any, config: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray awaits it
        """Load the tokenizer, learn the model name and context length from a replica, connect the directory."""
        from transformers import AutoTokenizer

        from fitserve.quant.model_store import resolve_model
        from fitserve.server.scaleout.client import ReplicaEngineClient
        from fitserve.server.scaleout.directory import get_directory

        self._config = ScaleoutConfig.model_validate(config)
        settings = self._config.engine_settings()
        model_dir = resolve_model(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=settings.trust_remote_code)
        info = await engine_handle.info.remote()
        self._client = ReplicaEngineClient(engine_handle, tokenizer, info["model_name"], info["max_model_len"])
        self._directory = get_directory(self._config.directory_name, DIRECTORY_NAMESPACE)
        self._decisions: dict[str, Any] = {}
        self._refresh = asyncio.get_running_loop().create_task(self._refresh_decisions())

    async def _refresh_decisions(self) -> None:
        """Keep a recent copy of the autoscaler's decisions for /metrics (rendered synchronously)."""
        while True:
            with contextlib.suppress(Exception):
                self._decisions = await self._directory.decisions.remote()
            await asyncio.sleep(DECISIONS_REFRESH_S)

    def __serve_build_asgi_app__(self) -> FastAPI:
        """fitserve's app around the replica client, with the scrape-target route added."""
        from fitserve.server.app import create_app
        from fitserve.server.scaleout.metrics import IngressMetrics

        app = create_app(
            self._config.engine_settings(), engine=self._client, metrics=IngressMetrics(lambda: self._decisions)
        )
        directory = self._directory

        @app.get("/metrics/targets", include_in_schema=False)
        async def metrics_targets() -> JSONResponse:
            """Prometheus http_sd_config: every live replica's metrics address, labelled `replica`."""
            return JSONResponse(await directory.targets.remote())

        return app
