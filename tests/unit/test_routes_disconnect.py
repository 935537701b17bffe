"""A client that goes away aborts its engine requests, streaming or not (raw ASGI calls, no sockets)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from fitserve.server.app import create_app
from fitserve.server.settings import Settings
from tests.fakes import FakeEngine

MODEL = "fake-model"


async def _call_then_disconnect(
    engine: FakeEngine, path: str, body: dict[str, Any], disconnect_after_s: float, spec_version: str
) -> list[dict[str, Any]]:
    app = create_app(Settings(), engine=engine)
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "http.request", "body": raw, "more_body": False})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    await asyncio.sleep(disconnect_after_s)
    for _ in range(500):  # on a loaded machine the request may still be in the tokenizer pool: wait until it runs
        if engine.submitted or task.done():
            break
        await asyncio.sleep(0.01)
    await inbox.put({"type": "http.disconnect"})
    await asyncio.wait_for(task, timeout=5)
    await asyncio.sleep(0.05)  # let detached abort calls run
    return sent


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": True}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}),
    ],
)
def test_disconnect_mid_generation_aborts(path: str, body: dict[str, Any], spec_version: str) -> None:
    engine = FakeEngine(model_name=MODEL, reply_words=200, token_delay_s=0.02)
    body = {**body, "max_tokens": 200}
    sent = asyncio.run(_call_then_disconnect(engine, path, body, 0.3, spec_version))
    assert engine.submitted, "the request never reached the engine"
    assert sorted(engine.aborted) == sorted(r.request_id for r in engine.submitted)
    assert not engine.running
    assert not engine.finished
    if body.get("stream"):
        assert sent[0]["status"] == 200
        streamed = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        assert streamed.startswith(b"data: ") and b"[DONE]" not in streamed


def test_disconnect_before_first_token_aborts() -> None:
    engine = FakeEngine(model_name=MODEL, token_delay_s=5.0)
    body = {"model": MODEL, "prompt": "x", "stream": True}
    sent = asyncio.run(_call_then_disconnect(engine, "/v1/completions", body, 0.2, "2.3"))
    assert len(engine.submitted) == 1
    assert engine.aborted == [engine.submitted[0].request_id]
    assert not any(m["type"] == "http.response.start" and m["status"] == 200 for m in sent)
