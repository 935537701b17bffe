"""Protocol schemas: validation, conversion to SamplingParams, and wire shapes."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fitserve.server.engine.types import FinishReason
from fitserve.server.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, Delta
from fitserve.server.protocol.common import Usage, finish_reason_name
from fitserve.server.protocol.completions import CompletionRequest
from fitserve.server.protocol.tokenize import DetokenizeRequest, TokenizeRequest

USER = [{"role": "user", "content": "hi"}]


def test_completion_to_params_defaults_and_seed_offsets() -> None:
    request = CompletionRequest(model="m", prompt="x", seed=10, stop="END", n=3)
    params = request.to_params(default_max_tokens=16, seed_offset=2)
    assert params.max_tokens == 16
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k is None
    assert params.seed == 12
    assert params.stop == ("END",)
    assert params.logprobs is None


def test_unseeded_request_stays_unseeded() -> None:
    params = CompletionRequest(model="m", prompt="x").to_params(16, seed_offset=1)
    assert params.seed is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("text", ["text"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_prompt_forms(prompt: object, expected: list[object]) -> None:
    assert CompletionRequest(model="m", prompt=prompt).prompts() == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": -1},
        {"max_tokens": 0},
        {"temperature": 2.5},
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"n": 0},
        {"logprobs": 21},
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [1, -2]},
        {"suffix": "tail"},
        {"stream_options": {"include_usage": True}},  # without stream
        {"echo": True, "logprobs": 1},
        {"presence_penalty": 3},
        {"stop": [str(i) for i in range(20)]},
    ],
)
def test_invalid_completion_fields(fields: dict[str, object]) -> None:
    body = {"model": "m", "prompt": "x", **fields}
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_chat_max_completion_tokens_wins_and_logprobs() -> None:
    request = ChatCompletionRequest(
        model="m", messages=USER, max_tokens=5, max_completion_tokens=7, logprobs=True, top_logprobs=3
    )
    params = request.to_params(default_max_tokens=100)
    assert params.max_tokens == 7
    assert params.logprobs == 3
    assert ChatCompletionRequest(model="m", messages=USER, logprobs=True).to_params(1).logprobs == 0
    assert ChatCompletionRequest(model="m", messages=USER).to_params(42).max_tokens == 42


def test_chat_default_max_tokens_never_below_one() -> None:
    assert ChatCompletionRequest(model="m", messages=USER).to_params(default_max_tokens=-5).max_tokens == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"top_logprobs": 2},  # without logprobs
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"max_completion_tokens": 0},
    ],
)
def test_invalid_chat_fields(fields: dict[str, object]) -> None:
    body = {"model": "m", "messages": USER, **fields}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_chat_message_text_parts_and_developer_role() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None},
            ],
        }
    )
    assert request.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


def test_chunk_json_drops_null_delta_fields_only() -> None:
    chunk = ChatCompletionChunk(
        id="c", created=1, model="m", choices=[ChunkChoice(index=0, delta=Delta(), finish_reason="stop")]
    )
    body = json.loads(chunk.to_json())
    assert body["choices"][0]["delta"] == {}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["object"] == "chat.completion.chunk"
    assert "usage" in body


def test_usage_and_finish_reason_names() -> None:
    assert Usage.of(3, 4).total_tokens == 7
    assert finish_reason_name(FinishReason.LENGTH) == "length"
    assert finish_reason_name(FinishReason.STOP) == "stop"
    assert finish_reason_name(None) is None


def test_tokenize_requests() -> None:
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({"prompt": "a", "messages": USER})
    with pytest.raises(ValidationError):
        TokenizeRequest.model_validate({})
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": [1, -1]})
    assert TokenizeRequest.model_validate({"messages": USER}).messages is not None
