"""The OpenAPI document at /openapi.json: real request bodies, the error responses, SSE for streams.

Routes declare their pydantic request models (FastAPI derives the bodies from them) and `ERROR_RESPONSES`;
`install_openapi` drops the 422 FastAPI documents for every body, since validation errors leave as 400 in
OpenAI's shape (see `server.app.validation_to_api_error`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from fitserve.server.protocol.errors import ErrorResponse

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a bad value, an unsupported parameter, malformed JSON",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model or route",
    413: "Request body over the size limit",
    429: "Queue or tokenizer backlog full; retry after the Retry-After header's seconds",
    500: "Internal error (the log has the details under the request id)",
    503: "Loading, shutting down, or the engine is not running",
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in _ERROR_DESCRIPTIONS.items()
}

SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One server-sent event: `data` holds a JSON chunk of the response, or `[DONE]` last",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
"""One event of a stream. In an OpenAPI 3.1 document (ours) a `text/event-stream` `schema` describes each event, so a
plain `{"type": "string"}` made every event a schema violation. 3.2's `itemSchema` is left out on purpose: where it is
present, 3.2-aware tools (schemathesis) read `schema` as the whole stream, an array of events, and an event schema
there failed CI's fuzz step on a valid stream."""

STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The response body, or with `stream: true` server-sent events ending in `data: [DONE]`",
        "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
    },
    **ERROR_RESPONSES,
}


def install_openapi(app: FastAPI, served_model: Callable[[], str | None]) -> None:
    """Serve FastAPI's document without the framework's 422 responses and schemas.

    Once a model is served, every request body's `model` property carries its name as the example, so clients
    (and a fuzzer) can see a valid request.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return _with_model_examples(app.openapi_schema, served_model())

    app.openapi = openapi  # type: ignore[method-assign]


def _with_model_examples(schema: dict[str, Any], model: str | None) -> dict[str, Any]:
    """A copy of `schema` whose request bodies show `model` as the example model name."""
    if model is None:
        return schema
    document = copy.deepcopy(schema)
    for component in document.get("components", {}).get("schemas", {}).values():
        model_property = component.get("properties", {}).get("model")
        if component.get("title", "").endswith("Request") and model_property is not None:
            model_property["examples"] = [model]
    return document
