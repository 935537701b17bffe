"""Acceptance: the official `openai` client against a real `fitserve serve` with the default model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.live_server import live_server

pytestmark = pytest.mark.integration

SERVED = "smol"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def base_url(default_model_dir: Path) -> Iterator[str]:
    args = [
        "--model",
        str(default_model_dir),
        "--served-model-name",
        SERVED,
        "--max-model-len",
        "512",
        "--max-kv-tokens",
        "4096",
        "--max-batch-size",
        "4",
        "--max-body-bytes",
        "20000",
    ]
    with live_server(args) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [SERVED]


def test_chat_greedy_answers_paris(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=SERVED, messages=CAPITAL, temperature=0, max_tokens=24)
    choice = response.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage is not None and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens <= 24


def test_completion_length_and_usage(client: openai.OpenAI) -> None:
    response = client.completions.create(model=SERVED, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5
    assert response.choices[0].text


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=SERVED, messages=CAPITAL, max_completion_tokens=3, temperature=0)
    assert response.usage is not None and response.usage.completion_tokens <= 3


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SERVED,
        messages=CAPITAL,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is [c for c in chunks if c.choices][-1]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    greedy = client.chat.completions.create(model=SERVED, messages=CAPITAL, temperature=0, max_tokens=24)
    assert text == greedy.choices[0].message.content  # streaming and non-streaming agree


def test_completion_streaming(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=SERVED, prompt="Once upon a time", max_tokens=6, stream=True, temperature=0
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


def test_n_and_seed_reproducibility(client: openai.OpenAI) -> None:
    kwargs = {"model": SERVED, "messages": CAPITAL, "n": 2, "seed": 1234, "temperature": 1.0, "max_tokens": 12}
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    other = client.chat.completions.create(**{**kwargs, "seed": 99})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]


def test_stop_string(client: openai.OpenAI) -> None:
    prompt = "List the numbers: one, two, three, four, five,"
    free = client.completions.create(model=SERVED, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    words = [w.strip(",. ") for w in free.split() if w.strip(",. ")]
    assert len(words) >= 2, free
    stop = words[1]
    stopped = client.completions.create(model=SERVED, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert free.startswith(choice.text)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 3.0},
        {"max_tokens": -1},
        {"top_p": 0.0},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
    ],
)
def test_bad_requests_are_400(client: openai.OpenAI, kwargs: dict[str, object]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": SERVED, "messages": CAPITAL, **kwargs})
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_prompt_too_long_names_length_and_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=SERVED, prompt="hello " * 600, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    message = caught.value.body["message"]  # type: ignore[index]
    assert "601" in message and "512" in message  # how long, and the limit


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CAPITAL)
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_http_level_errors(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        too_big = http.post("/v1/completions", json={"model": SERVED, "prompt": "x" * 30000})
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
        wrong_method = http.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        missing = http.get("/v1/nope")
        assert missing.status_code == 404 and "error" in missing.json()
        invalid = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert invalid.status_code == 400 and invalid.json()["error"]["code"] == "invalid_json"
        out_of_vocab = http.post("/v1/completions", json={"model": SERVED, "prompt": [1, 2, 10**8], "max_tokens": 2})
        assert out_of_vocab.status_code == 400 and out_of_vocab.json()["error"]["param"] == "prompt"
        assert http.get("/health").status_code == 200  # the bad ids never reached the engine
        assert http.get("/ready").status_code == 200
        assert http.get("/version").json()["version"]
        tokens = http.post("/tokenize", json={"prompt": "Paris"}).json()["tokens"]
        assert http.post("/detokenize", json={"tokens": tokens}).json()["prompt"].endswith("Paris")
