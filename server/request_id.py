"""Request ids: one per HTTP request, sent back as `X-Request-Id` and in error bodies, and used in log lines.

The guard middleware sets the id for the request it is handling; code below it (handlers, serving classes, error
mapping) reads it with `current_request_id()`. A client may send its own `X-Request-Id` (a short token of
letters, digits, `-`, `_`, `.`); anything else is replaced by a fresh id.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_current: ContextVar[str | None] = ContextVar("fitserve_request_id", default=None)


def new_request_id(client_value: str | None = None) -> str:
    """The client's id when it is a short safe token, otherwise a fresh random one."""
    if client_value is not None and _CLIENT_ID.fullmatch(client_value):
        return client_value
    return f"req-{uuid.uuid4().hex}"


def set_request_id(request_id: str) -> None:
    """Make `request_id` the current request's id (the middleware calls this once per request)."""
    _current.set(request_id)


def current_request_id() -> str | None:
    """The id of the request being handled, or None outside a request."""
    return _current.get()
