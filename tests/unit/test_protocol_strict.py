"""Request bodies are typed as OpenAI types them; unimplemented parameters are refused by name; stop caps."""

from __future__ import annotations

from typing import Any

import pytest

from fitserve.server.protocol.common import MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from tests.fakes.routes import MODEL, assert_openai_error, make_client

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def post(path: str, **fields: Any) -> Any:
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 2}
    base |= {"messages": USER} if path == CHAT else {"prompt": "hi"}
    return make_client().post(path, json={**base, **fields})


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("stream", 1),
        ("n", "2"),
        ("n", 2.0),
        ("max_tokens", "3"),
        ("max_tokens", True),
        ("temperature", "0.5"),
        ("top_p", True),
        ("stop", 7),
        ("stop_token_ids", ["2"]),
        ("ignore_eos", "true"),
        ("model", 3),
    ],
)
def test_lax_values_are_400(path: str, field: str, value: Any) -> None:
    error = assert_openai_error(post(path, **{field: value}), 400, "invalid_value")
    assert error["param"].split(".")[0] == field


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        (CHAT, {"logprobs": "true"}, "logprobs"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (COMPLETIONS, {"prompt": ["1", 2]}, "prompt.1"),
        (COMPLETIONS, {"prompt": [["1"]]}, "prompt.0.0"),
        (COMPLETIONS, {"echo": "no"}, "echo"),
        (COMPLETIONS, {"logprobs": 1.5}, "logprobs"),
    ],
)
def test_lax_values_in_endpoint_fields_are_400(path: str, fields: dict[str, Any], param: str) -> None:
    error = assert_openai_error(post(path, **fields), 400, "invalid_value")
    assert error["param"].startswith(param.split(".")[0]), error


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_integers_are_numbers(path: str) -> None:
    response = post(path, temperature=1, top_p=1, presence_penalty=0, frequency_penalty=1)
    assert response.status_code == 200, response.text


def test_nan_is_refused() -> None:
    body = b'{"model": "fake-model", "prompt": "hi", "temperature": NaN}'
    response = make_client().post(COMPLETIONS, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
        (CHAT, "tool_choice", "auto"),
        (CHAT, "tool_choice", {"type": "function", "function": {"name": "f"}}),
        (CHAT, "functions", [{"name": "f"}]),
        (CHAT, "function_call", "auto"),
        (CHAT, "response_format", {"type": "json_object"}),
        (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
        (CHAT, "modalities", ["text", "audio"]),
        (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
        (CHAT, "prediction", {"type": "content", "content": "x"}),
        (CHAT, "web_search_options", {}),
        (CHAT, "reasoning_effort", "high"),
        (COMPLETIONS, "suffix", "tail"),
        (COMPLETIONS, "best_of", 3),
    ],
)
def test_unimplemented_parameters_are_400_naming_the_field(path: str, field: str, value: Any) -> None:
    error = assert_openai_error(post(path, **{field: value}), 400, "unsupported_parameter")
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT, "tools", []),
        (CHAT, "tool_choice", "none"),
        (CHAT, "response_format", {"type": "text"}),
        (CHAT, "modalities", ["text"]),
        (CHAT, "parallel_tool_calls", False),
        (COMPLETIONS, "best_of", 1),
        (COMPLETIONS, "suffix", ""),
    ],
)
def test_no_op_values_of_those_parameters_are_accepted(path: str, field: str, value: Any) -> None:
    assert post(path, **{field: value}).status_code == 200


def test_stop_strings_are_capped_in_count_and_length() -> None:
    assert post(COMPLETIONS, stop=["x" * MAX_STOP_CHARS] * MAX_STOP_SEQUENCES).status_code == 200
    too_many = assert_openai_error(post(COMPLETIONS, stop=["a"] * (MAX_STOP_SEQUENCES + 1)), 400, "invalid_value")
    assert too_many["param"] == "stop" and str(MAX_STOP_SEQUENCES) in too_many["message"]
    too_long = assert_openai_error(post(CHAT, stop="x" * (MAX_STOP_CHARS + 1)), 400, "invalid_value")
    assert too_long["param"] == "stop" and str(MAX_STOP_CHARS) in too_long["message"]
    one_mib = assert_openai_error(post(CHAT, stop=["y" * ((1 << 20) - 200)]), 400, "invalid_value")
    assert one_mib["param"] == "stop"
