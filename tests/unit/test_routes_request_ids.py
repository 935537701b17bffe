"""Request ids on every response; clients get stable messages, never exception text (the log has it)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from fitserve.server.engine.types import EngineUnavailableError
from tests.fakes import FakeEngine
from tests.fakes.routes import MODEL, assert_openai_error, make_client

SECRET = "/srv/secret/weights.bin"
USER = [{"role": "user", "content": "hi"}]


class LeakyEngine(FakeEngine):
    """An engine whose failures carry internals, as a dead loop's `repr(exception)` does."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError(f"tokenizer state at {SECRET} is corrupt")

    def detokenize(self, token_ids: Sequence[int]) -> str:
        raise ValueError(f"vocab file {SECRET} is missing")

    async def check_health(self) -> None:
        raise EngineUnavailableError(f"The engine loop died: RuntimeError('{SECRET}')")


def logged_with_id(caplog: pytest.LogCaptureFixture, detail: str, request_id: str) -> bool:
    """Whether one log line carries both the hidden detail and the request id."""
    return any(detail in record.getMessage() and request_id in record.getMessage() for record in caplog.records)


def test_every_response_carries_a_request_id_and_errors_repeat_it() -> None:
    client = make_client()
    ok = client.get("/health")
    assert ok.headers["x-request-id"].startswith("req-")
    error = assert_openai_error(client.post("/v1/completions", json={"model": MODEL}), 400)
    assert error["request_id"] != ok.headers["x-request-id"]


def test_a_safe_client_request_id_is_kept_and_an_unsafe_one_replaced() -> None:
    client = make_client()
    assert client.get("/health", headers={"X-Request-Id": "trace-42.a_b"}).headers["x-request-id"] == "trace-42.a_b"
    replaced = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced.startswith("req-")


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/tokenize", {"model": MODEL, "prompt": "hi"}, 400),
        ("/detokenize", {"model": MODEL, "tokens": [1, 2]}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}, 400),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2], "echo": True, "max_tokens": 1}, 400),
    ],
)
def test_tokenizer_failures_do_not_leak(
    path: str, body: dict[str, object], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(LeakyEngine(model_name=MODEL))
    with caplog.at_level(logging.INFO):
        response = client.post(path, json=body)
    error = assert_openai_error(response, status)
    assert SECRET not in response.text
    assert any(
        SECRET in record.getMessage() and error["request_id"] in record.getMessage() for record in caplog.records
    )


def test_a_dead_engine_does_not_leak_through_health(caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(LeakyEngine(model_name=MODEL))
    with caplog.at_level(logging.INFO):
        response = client.get("/health")
    error = assert_openai_error(response, 503, "engine_unavailable")
    assert SECRET not in response.text
    assert any(
        SECRET in record.getMessage() and error["request_id"] in record.getMessage() for record in caplog.records
    )


class BrokenEngine(FakeEngine):
    @property
    def max_model_len(self) -> int:
        raise RuntimeError(f"bug near {SECRET}")


def test_unexpected_errors_are_500_with_a_stable_message_and_the_id(caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(BrokenEngine(model_name=MODEL))
    with caplog.at_level(logging.INFO):
        response = client.get("/v1/models")
    error = assert_openai_error(response, 500, "internal_error")
    assert SECRET not in response.text and error["message"] == "Internal server error."
    assert any(error["request_id"] in record.getMessage() for record in caplog.records)


def test_non_template_chat_errors_get_a_stable_message() -> None:
    engine = FakeEngine(model_name=MODEL)

    def broken(messages: object, add_generation_prompt: bool = True) -> list[int]:
        raise AssertionError(f"bug near {SECRET}")  # not a template error: a bug

    engine.apply_chat_template = broken  # type: ignore[method-assign,assignment]
    client = make_client(engine)
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER})
    error = assert_openai_error(response, 400)
    assert SECRET not in response.text and error["message"] == "could not apply the chat template."
