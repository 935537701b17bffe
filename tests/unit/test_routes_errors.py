"""The error matrix against the FakeEngine: every failure is an OpenAI-shaped body with the right status."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fitserve.server.engine.types import EngineOverloadedError, EngineUnavailableError
from tests.fakes import FakeEngine
from tests.fakes.routes import MODEL, assert_openai_error, make_client, sse_events

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (COMPLETIONS, {"max_tokens": -1}, "max_tokens"),
        (COMPLETIONS, {"temperature": 2.1}, "temperature"),
        (COMPLETIONS, {"top_p": 0}, "top_p"),
        (COMPLETIONS, {"top_p": 1.01}, "top_p"),
        (COMPLETIONS, {"n": 0}, "n"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (CHAT, {"max_completion_tokens": -3}, "max_completion_tokens"),
        (CHAT, {"temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_values_are_400(path: str, fields: dict[str, object], param: str) -> None:
    base = {"model": MODEL, "prompt": "x"} if path == COMPLETIONS else {"model": MODEL, "messages": USER}
    error = assert_openai_error(make_client().post(path, json={**base, **fields}), 400, "invalid_value")
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert param in error["message"]


def test_missing_field_and_bad_json_are_400() -> None:
    client = make_client()
    error = assert_openai_error(client.post(CHAT, json={"model": MODEL}), 400, "missing_required_parameter")
    assert error["param"] == "messages"
    bad = client.post(CHAT, content=b"{nope", headers={"content-type": "application/json"})
    assert_openai_error(bad, 400, "invalid_json")
    assert_openai_error(client.post(CHAT, content=b"messages=1"), 400)


def test_unknown_model_is_404() -> None:
    for path, body in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": USER})):
        error = assert_openai_error(make_client().post(path, json={"model": "gpt-4", **body}), 404, "model_not_found")
        assert "gpt-4" in error["message"] and MODEL in error["message"]
    assert_openai_error(make_client().post("/tokenize", json={"model": "gpt-4", "prompt": "x"}), 404)


def test_unknown_route_and_wrong_method() -> None:
    client = make_client()
    assert_openai_error(client.get("/v1/nothing"), 404, "not_found")
    wrong = client.get(COMPLETIONS)
    assert_openai_error(wrong, 405, "method_not_allowed")
    assert "POST" in wrong.headers["allow"]


def test_prompt_too_long_says_how_long_and_the_limit() -> None:
    client = make_client(FakeEngine(model_name=MODEL, max_model_len=40))
    error = assert_openai_error(
        client.post(COMPLETIONS, json={"model": MODEL, "prompt": "y" * 50, "max_tokens": 5}),
        400,
        "context_length_exceeded",
    )
    assert "51" in error["message"] and "40" in error["message"]
    assert error["param"] == "prompt"
    chat = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "z" * 60}]})
    assert assert_openai_error(chat, 400, "context_length_exceeded")["param"] == "messages"


@pytest.fixture
def keyed_client() -> Iterator[object]:
    yield make_client(api_key="sekret")


def test_api_key_required_on_v1(keyed_client: object) -> None:
    client = keyed_client
    body = {"model": MODEL, "prompt": "x"}
    error = assert_openai_error(client.post(COMPLETIONS, json=body), 401, "invalid_api_key")  # type: ignore[attr-defined]
    assert error["type"] == "authentication_error"
    wrong = client.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer nope"})  # type: ignore[attr-defined]
    assert_openai_error(wrong, 401, "invalid_api_key")
    # even an invalid body is refused with 401 first: nothing is parsed before authentication
    assert_openai_error(client.post(COMPLETIONS, content=b"{"), 401)  # type: ignore[attr-defined]
    assert_openai_error(client.get("/v1/models"), 401)  # type: ignore[attr-defined]
    ok = client.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer sekret"})  # type: ignore[attr-defined]
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # type: ignore[attr-defined]


def test_body_over_limit_is_413_by_header_and_by_stream() -> None:
    client = make_client(max_body_bytes=200)
    big = {"model": MODEL, "prompt": "x" * 500}
    assert_openai_error(client.post(COMPLETIONS, json=big), 413, "request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'

    chunked = client.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(chunked, 413, "request_too_large")
    assert client.post(COMPLETIONS, json={"model": MODEL, "prompt": "small"}).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_queue_full_is_429_with_retry_after(stream: bool) -> None:
    engine = FakeEngine(model_name=MODEL, max_running=0)
    response = make_client(engine).post(CHAT, json={"model": MODEL, "messages": USER, "stream": stream})
    error = assert_openai_error(response, 429, "queue_full")
    assert error["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "2"


def test_n_that_does_not_all_fit_is_refused_as_a_whole() -> None:
    engine = FakeEngine(model_name=MODEL, max_running=1, token_delay_s=0.05)
    response = make_client(engine).post(COMPLETIONS, json={"model": MODEL, "prompt": "x", "n": 2})
    assert_openai_error(response, 429, "queue_full")
    assert engine.submitted == [] and engine.aborted == []  # no choice was admitted, none had to be aborted


def test_engine_unavailable_and_dead_are_503() -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine)
    engine.admission_error = EngineUnavailableError("loading")
    assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": USER}), 503, "engine_unavailable")
    engine.admission_error = None
    engine.dead = True
    assert_openai_error(client.get("/health"), 503, "engine_unavailable")
    client.app.state.server.engine = None
    assert_openai_error(client.get("/v1/models"), 503, "engine_unavailable")


def test_draining_server_refuses_new_work() -> None:
    client = make_client()
    client.app.state.server.draining = True
    assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": USER}), 503, "engine_unavailable")


def test_failure_mid_generation() -> None:
    engine = FakeEngine(model_name=MODEL)
    engine.fail_after_tokens = 2
    client = make_client(engine)
    assert_openai_error(client.post(COMPLETIONS, json={"model": MODEL, "prompt": "x"}), 503, "out_of_memory")
    events = sse_events(client.post(CHAT, json={"model": MODEL, "messages": USER, "stream": True}).text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "out_of_memory"
    contents = [event["choices"][0]["delta"].get("content") for event in events[1:-2]]
    assert len(contents) == 2 and all(contents)  # the two tokens made before the failure were delivered
    engine.admission_error = EngineOverloadedError("oom")
    assert_openai_error(client.post(CHAT, json={"model": MODEL, "messages": USER}), 503, "out_of_memory")


def test_unexpected_exception_is_an_openai_500() -> None:
    class BrokenEngine(FakeEngine):
        async def check_health(self) -> None:
            raise RuntimeError("boom: secret internals")

    response = make_client(BrokenEngine(model_name=MODEL)).get("/health")
    error = assert_openai_error(response, 500, "internal_error")
    assert "secret internals" not in response.text and "Traceback" not in response.text
    assert error["type"] == "server_error"


def test_out_of_vocabulary_token_ids_are_400() -> None:
    client = make_client()
    assert_openai_error(client.post(COMPLETIONS, json={"model": MODEL, "prompt": [1, 999]}), 400, "invalid_value")
    assert_openai_error(client.post("/detokenize", json={"tokens": [1000]}), 400, "invalid_value")
