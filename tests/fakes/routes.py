"""Shared helpers for the route tests: an app around a FakeEngine, SSE parsing."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from fitserve.server.app import create_app
from fitserve.server.settings import Settings
from tests.fakes import FakeEngine

MODEL = "fake-model"


def make_client(engine: FakeEngine | None = None, metrics: Any = None, **settings: Any) -> TestClient:
    """A TestClient around `create_app` with a FakeEngine (no lifespan engine building)."""
    app = create_app(Settings(**settings), engine=engine or FakeEngine(model_name=MODEL), metrics=metrics)
    return TestClient(app, raise_server_exceptions=False)


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body into JSON payloads, '[DONE]' kept as the string."""
    assert text.endswith("\n\n"), "SSE body must end with a blank line"
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """Check status and the OpenAI error shape; return the inner error object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"] and error["request_id"] == response.headers["x-request-id"], error
    if code is not None:
        assert error["code"] == code, error
    return error
