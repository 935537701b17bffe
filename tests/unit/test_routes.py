"""Routes against the FakeEngine: successful completions, chat, streaming, models, tokenize, health."""

from __future__ import annotations

from tests.fakes import FakeEngine
from tests.fakes.engine import GREEDY_REPLY
from tests.fakes.routes import MODEL, make_client, sse_events


def test_completion_text_prompt() -> None:
    engine = FakeEngine(model_name=MODEL, reply_words=4)
    response = make_client(engine).post("/v1/completions", json={"model": MODEL, "prompt": "hi", "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == " ".join(GREEDY_REPLY[:4])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert engine.submitted[0].prompt_token_ids == (1, ord("h"), ord("i"))
    assert engine.submitted[0].params.max_tokens == 16  # OpenAI's default for completions


def test_completion_length_and_token_prompts() -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine)
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 6], [7]], "max_tokens": 2, "n": 2})
    body = response.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 3  # each prompt counted once, not once per choice
    assert body["usage"]["completion_tokens"] == 8
    assert sorted(r.prompt_token_ids for r in engine.submitted) == [(5, 6), (5, 6), (7,), (7,)]


def test_completion_echo_and_logprobs() -> None:
    client = make_client()
    echoed = client.post("/v1/completions", json={"model": MODEL, "prompt": [72, 105], "echo": True, "temperature": 0})
    assert echoed.json()["choices"][0]["text"].startswith("HiParis")
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 2, "max_tokens": 3})
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == 3
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(logprobs["tokens"][0])


def test_n_choices_use_distinct_seeds_and_are_reproducible() -> None:
    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine)
    body = {"model": MODEL, "prompt": "x", "n": 2, "seed": 7, "max_tokens": 6}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]
    assert sorted(r.params.seed for r in engine.submitted[:2]) == [7, 8]


def test_stop_strings_end_with_stop() -> None:
    body = {"model": MODEL, "prompt": "x", "temperature": 0, "stop": [" capital"]}
    choice = make_client().post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == "Paris is the"
    assert choice["finish_reason"] == "stop"


def test_chat_completion() -> None:
    engine = FakeEngine(model_name=MODEL, max_model_len=200)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is the capital of France?"}]
    response = make_client(engine).post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "temperature": 0}
    )
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert "Paris" in body["choices"][0]["message"]["content"]
    prompt = engine.submitted[0].prompt_token_ids
    assert bytes(prompt).decode().endswith("<assistant>")
    assert engine.submitted[0].params.max_tokens == 200 - len(prompt)  # default: fill the context
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_chat_logprobs() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
    choice = make_client().post("/v1/chat/completions", json=body).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 6
    assert len(content[0]["top_logprobs"]) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())


def test_chat_stream_shape_with_usage() -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
        "max_tokens": 3,
    }
    response = make_client().post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["delta"] == {}
        assert all(choice["finish_reason"] is None for choice in mine[:-1])
        assert len("".join(choice["delta"].get("content", "") for choice in mine).split()) == 3
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 6


def test_completion_stream_without_usage() -> None:
    body = {"model": MODEL, "prompt": "x", "stream": True, "temperature": 0, "max_tokens": 2, "echo": True}
    events = sse_events(make_client().post("/v1/completions", json=body).text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "\x01xParis is"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_models_route() -> None:
    client = make_client()
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert client.get("/v1/models/other").status_code == 404


def test_tokenize_and_detokenize_round_trip() -> None:
    client = make_client()
    tokens = client.post("/tokenize", json={"prompt": "hé", "add_special_tokens": False}).json()
    assert tokens["tokens"] == list("hé".encode()) and tokens["count"] == 3 and tokens["max_model_len"] == 256
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hé"}
    chat = client.post("/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]}).json()
    assert bytes(chat["tokens"]).decode() == "<user>a\n<assistant>"


def test_health_ready_version_and_metrics() -> None:
    class Metrics:
        def render(self) -> tuple[bytes, str]:
            return b"fitserve_up 1\n", "text/plain; version=0.0.4; charset=utf-8"

    engine = FakeEngine(model_name=MODEL)
    client = make_client(engine, metrics=Metrics())
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert client.get("/version").json()["version"]
    metrics = client.get("/metrics")
    assert metrics.text == "fitserve_up 1\n" and metrics.headers["content-type"].startswith("text/plain")
    engine.ready = False
    assert client.get("/ready").status_code == 503
    client.app.state.server.draining = True
    assert client.get("/ready").status_code == 503
