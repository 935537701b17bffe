"""OpenAI-shaped errors: the schema every non-2xx body follows, and the exception that carries one.

Every error the server returns is `{"error": {"message", "type", "param", "code", "request_id"}}`; handlers in
`server.app` turn `APIError` (and framework/engine errors) into that body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydantic import BaseModel

from fitserve.server.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    RequestFailedError,
)
from fitserve.server.request_id import current_request_id


class ErrorType(enum.StrEnum):
    """OpenAI's `error.type` values used by this server."""

    INVALID_REQUEST = "invalid_request_error"
    AUTHENTICATION = "authentication_error"
    NOT_FOUND = "not_found_error"
    RATE_LIMIT = "rate_limit_error"
    SERVER = "server_error"
    SERVICE_UNAVAILABLE = "service_unavailable_error"


class ErrorDetail(BaseModel):
    """The inner object of an error body."""

    message: str
    type: ErrorType
    param: str | None = None
    code: str | None = None
    request_id: str | None = None  # also in the X-Request-Id header; the server log carries the details


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


_TYPE_BY_STATUS: dict[int, ErrorType] = {
    400: ErrorType.INVALID_REQUEST,
    401: ErrorType.AUTHENTICATION,
    404: ErrorType.INVALID_REQUEST,  # OpenAI reports unknown models as invalid_request_error
    405: ErrorType.INVALID_REQUEST,
    413: ErrorType.INVALID_REQUEST,
    429: ErrorType.RATE_LIMIT,
    503: ErrorType.SERVICE_UNAVAILABLE,
}


def error_type_for(status_code: int) -> ErrorType:
    """The conventional error type for an HTTP status."""
    if status_code in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status_code]
    return ErrorType.SERVER if status_code >= 500 else ErrorType.INVALID_REQUEST


@dataclass(frozen=True)
class HTTPErrorMapping:
    """How one engine error class leaves the server: HTTP status and OpenAI `error.code` (type follows status)."""

    status_code: int
    code: str


# The one table from engine errors to HTTP. A subclass not listed maps like its nearest listed base class.
ENGINE_ERROR_HTTP: dict[type[EngineError], HTTPErrorMapping] = {
    InvalidRequestError: HTTPErrorMapping(400, "invalid_request"),
    PromptTooLongError: HTTPErrorMapping(400, "context_length_exceeded"),
    QueueFullError: HTTPErrorMapping(429, "queue_full"),
    RequestFailedError: HTTPErrorMapping(500, "request_failed"),
    EngineOverloadedError: HTTPErrorMapping(503, "out_of_memory"),
    EngineUnavailableError: HTTPErrorMapping(503, "engine_unavailable"),
    EngineError: HTTPErrorMapping(500, "internal_error"),
}


def http_mapping_for(error: EngineError) -> HTTPErrorMapping:
    """The HTTP status and code of an engine error (from `ENGINE_ERROR_HTTP`)."""
    for cls in type(error).__mro__:
        if cls in ENGINE_ERROR_HTTP:
            return ENGINE_ERROR_HTTP[cls]
    return ENGINE_ERROR_HTTP[EngineError]


class APIError(Exception):
    """An error to report to the client with a given HTTP status and OpenAI body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: ErrorType | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or error_type_for(status_code)
        self.headers = headers or {}

    def to_response(self) -> ErrorResponse:
        """The OpenAI error body, with the current request's id."""
        return ErrorResponse(
            error=ErrorDetail(
                message=self.message,
                type=self.error_type,
                param=self.param,
                code=self.code,
                request_id=current_request_id(),
            )
        )

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
        """A 400 for a bad parameter value."""
        return cls(400, message, code=code, param=param)

    @classmethod
    def from_engine(cls, error: EngineError, prompt_param: str | None = None) -> APIError:
        """Map an engine error to its HTTP status, code and headers (Retry-After on 429) through `ENGINE_ERROR_HTTP`.

        `prompt_param` names the request field blamed for a too-long prompt ("prompt" or "messages").
        """
        mapping = http_mapping_for(error)
        headers: dict[str, str] = {}
        if isinstance(error, QueueFullError):
            headers["Retry-After"] = str(max(1, int(error.retry_after_s)))
        param = prompt_param if isinstance(error, PromptTooLongError) else None
        if isinstance(error, InvalidRequestError) and error.param is not None:
            param = prompt_param if error.param == "prompt" and prompt_param else error.param
        return cls(mapping.status_code, str(error) or mapping.code, code=mapping.code, param=param, headers=headers)
