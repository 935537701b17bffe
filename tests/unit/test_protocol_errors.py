"""Engine errors -> HTTP in one table (server/protocol/errors.py); the engine's classes carry no status."""

from __future__ import annotations

import inspect

import pytest

from fitserve.server.engine import types
from fitserve.server.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
)
from fitserve.server.protocol.errors import ENGINE_ERROR_HTTP, APIError, ErrorType

ENGINE_ERRORS = [cls for _, cls in inspect.getmembers(types, inspect.isclass) if issubclass(cls, EngineError)]


def test_every_engine_error_has_a_row_and_no_http_attributes() -> None:
    assert set(ENGINE_ERRORS) == set(ENGINE_ERROR_HTTP)
    for cls in ENGINE_ERRORS:
        assert not hasattr(cls, "http_status") and not hasattr(cls, "code"), cls


@pytest.mark.parametrize(
    ("error", "status", "code", "error_type"),
    [
        (InvalidRequestError("bad"), 400, "invalid_request", ErrorType.INVALID_REQUEST),
        (PromptTooLongError(10, 5, 8, "model's context length"), 400, "context_length_exceeded", None),
        (QueueFullError(4, retry_after_s=3), 429, "queue_full", ErrorType.RATE_LIMIT),
        (RequestFailedError("x"), 500, "request_failed", ErrorType.SERVER),
        (EngineOverloadedError("oom"), 503, "out_of_memory", ErrorType.SERVICE_UNAVAILABLE),
        (EngineUnavailableError("dead"), 503, "engine_unavailable", ErrorType.SERVICE_UNAVAILABLE),
        (EngineError("?"), 500, "internal_error", ErrorType.SERVER),
    ],
)
def test_from_engine_maps_through_the_table(
    error: EngineError, status: int, code: str, error_type: ErrorType | None
) -> None:
    api = APIError.from_engine(error, prompt_param="messages")
    assert (api.status_code, api.code) == (status, code)
    if error_type is not None:
        assert api.error_type is error_type
    if isinstance(error, QueueFullError):
        assert api.headers == {"Retry-After": "3"}
    if isinstance(error, PromptTooLongError):
        assert api.param == "messages"


def test_an_invalid_request_names_its_field() -> None:
    assert APIError.from_engine(InvalidRequestError("x", param="logit_bias")).param == "logit_bias"
    assert APIError.from_engine(InvalidRequestError("x", param="prompt"), prompt_param="messages").param == "messages"
