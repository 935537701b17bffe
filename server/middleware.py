"""Pure-ASGI guard in front of every route: request id, API-key check and the request-body size limit.

It runs before FastAPI parses anything, so an unauthenticated or oversized request is refused (401/413,
OpenAI-shaped) without its body being decoded. Bodies are buffered up to the limit and replayed to the app;
both a too-large `Content-Length` and a streamed (chunked) body that grows past the limit get 413.

With an API key set, every route needs it except the probes (`/health`, `/ready`, `/version`) and, unless
`metrics_require_key`, `/metrics` (and `/metrics/targets`): the API, `/tokenize`, `/detokenize` and the OpenAPI
document are protected, and so is any unknown path (401 before 404, so a scan learns nothing). Every response
carries `X-Request-Id`.
"""

from __future__ import annotations

import secrets

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fitserve.server.protocol.errors import APIError, ErrorType
from fitserve.server.request_id import REQUEST_ID_HEADER, new_request_id, set_request_id

OPEN_PATHS = frozenset({"/health", "/ready", "/version"})
# `/metrics` and the Ray Serve ingress's Prometheus http_sd target list (server/scaleout/ingress.py).
METRICS_PATHS = frozenset({"/metrics", "/metrics/targets"})


def error_response(error: APIError) -> JSONResponse:
    """The JSON response for an `APIError`."""
    return JSONResponse(
        error.to_response().model_dump(mode="json"), status_code=error.status_code, headers=error.headers
    )


class RequestGuardMiddleware:
    """Request ids; 401 without the right bearer token (see the module doc); 413 for bodies over the limit."""

    def __init__(
        self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics_require_key: bool = False
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.open_paths = OPEN_PATHS if metrics_require_key else OPEN_PATHS | METRICS_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id(_header(scope, REQUEST_ID_HEADER.encode()))
        set_request_id(request_id)
        send = _with_request_id(send, request_id)
        error = self._check_auth(scope) or self._check_content_length(scope)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        body_messages, error = await self._read_body(receive)
        if error is not None:
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, _replay(body_messages, receive), send)

    def _check_auth(self, scope: Scope) -> APIError | None:
        if self.api_key is None or scope["path"] in self.open_paths:
            return None
        header = _header(scope, b"authorization")
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        message = "Missing API key: send 'Authorization: Bearer <key>'." if not header else "Incorrect API key."
        return APIError(
            401,
            message,
            code="invalid_api_key",
            error_type=ErrorType.AUTHENTICATION,
            headers={"WWW-Authenticate": "Bearer"},
        )

    def _check_content_length(self, scope: Scope) -> APIError | None:
        value = _header(scope, b"content-length")
        if value is None:
            return None
        try:
            length = int(value)
        except ValueError:
            return APIError.invalid("invalid Content-Length header", code="invalid_header")
        return self._too_large(length)

    def _too_large(self, length: int) -> APIError | None:
        if length <= self.max_body_bytes:
            return None
        return APIError(
            413,
            f"Request body is {length} bytes or more; the limit is {self.max_body_bytes} bytes.",
            code="request_too_large",
        )

    async def _read_body(self, receive: Receive) -> tuple[list[Message], APIError | None]:
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages, None
            received += len(message.get("body", b""))
            error = self._too_large(received)
            if error is not None:
                return messages, error
            if not message.get("more_body", False):
                return messages, None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _with_request_id(send: Send, request_id: str) -> Send:
    """A send callable that adds `X-Request-Id` to the response headers."""

    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
        await send(message)

    return send_with_id


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive callable that returns the buffered body first, then defers to the server's receive."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
