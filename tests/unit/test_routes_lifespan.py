"""The app's lifespan: the engine is built in the background, /ready is 503 until then, load failures surface."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi.testclient import TestClient

from fitserve.server.app import BuiltEngine, create_app
from fitserve.server.settings import Settings
from tests.fakes import FakeEngine
from tests.fakes.routes import MODEL, assert_openai_error


def _wait_for(client: TestClient, path: str, status: int, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get(path).status_code == status:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never returned {status}")


def test_ready_is_503_while_loading_then_200_and_engine_closed_on_shutdown() -> None:
    release = asyncio.Event()
    closed: list[bool] = []

    async def factory(_: Settings) -> BuiltEngine:
        await release.wait()

        async def close() -> None:
            closed.append(True)

        return BuiltEngine(engine=FakeEngine(model_name=MODEL), close=close)

    app = create_app(Settings(), engine_factory=factory)
    with TestClient(app) as client:
        error = assert_openai_error(client.get("/ready"), 503, "engine_unavailable")
        assert "loading" in error["message"]
        assert_openai_error(client.get("/health"), 503, "engine_unavailable")
        chat = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert_openai_error(chat, 503, "engine_unavailable")
        client.portal.call(release.set)  # type: ignore[union-attr]
        _wait_for(client, "/ready", 200)
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
        assert not closed
    assert closed == [True]


def test_load_failure_is_reported_and_signalled_without_its_text() -> None:
    failures: list[BaseException] = []

    async def factory(_: Settings) -> BuiltEngine:
        raise RuntimeError("weights are corrupt at /secret/path")

    app = create_app(Settings(), engine_factory=factory, on_fatal_error=failures.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        error = assert_openai_error(client.get("/health"), 503, "engine_unavailable")
        assert "failed to load" in error["message"] and "secret" not in error["message"]
        assert "failed to load" in client.get("/ready").json()["error"]["message"]
    assert len(failures) == 1 and "corrupt" in str(failures[0])


def test_a_dead_engine_loop_fails_health_stops_admission_and_signals_once() -> None:
    """Engine death: /health turns 503 (a supervisor restarts the process) and start-up is told to drain and exit."""
    engine = FakeEngine(model_name=MODEL)
    failures: list[BaseException] = []
    app = create_app(Settings(engine_health_interval_s=0.02), engine=engine, on_fatal_error=failures.append)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine.dead = True
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(failures) == 1
        assert_openai_error(client.get("/health"), 503, "engine_unavailable")
        assert_openai_error(client.get("/ready"), 503, "engine_unavailable")
        chat = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        )
        assert_openai_error(chat, 503, "engine_unavailable")
        time.sleep(0.1)
    assert len(failures) == 1


def test_an_app_needs_an_engine_or_a_factory() -> None:
    with pytest.raises(ValueError, match="engine"):
        create_app(Settings())
