"""/openapi.json describes the real request bodies, the OpenAI error responses and the SSE streams."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from tests.fakes.routes import MODEL, make_client


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    response = make_client().get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]]


@pytest.mark.parametrize(
    ("path", "model", "required"),
    [
        ("/v1/completions", "CompletionRequest", {"model", "prompt"}),
        ("/v1/chat/completions", "ChatCompletionRequest", {"model", "messages"}),
        ("/tokenize", "TokenizeRequest", set()),
        ("/detokenize", "DetokenizeRequest", {"tokens"}),
    ],
)
def test_routes_declare_their_request_models(
    document: dict[str, Any], path: str, model: str, required: set[str]
) -> None:
    ref = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith(f"/{model}")
    assert set(body_schema(document, path).get("required", [])) == required


def test_field_types_and_caps_are_in_the_document(document: dict[str, Any]) -> None:
    props = body_schema(document, "/v1/chat/completions")["properties"]
    assert props["stream"]["type"] == "boolean"
    assert props["n"]["type"] == "integer" and props["n"]["maximum"] == 16
    assert {"type": "integer", "minimum": 1} in props["max_tokens"]["anyOf"]
    stop_list = next(option for option in props["stop"]["anyOf"] if option.get("type") == "array")
    assert stop_list["maxItems"] == 16 and stop_list["items"]["maxLength"] == 1024
    assert "tools" in props and "response_format" in props  # refused by name, so documented


def test_error_responses_are_documented_and_422_is_not(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            for status in ("400", "401", "404", "429", "503"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/ErrorResponse"), (method, path, status)
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "request_id" in document["components"]["schemas"]["ErrorDetail"]["properties"]


def test_streams_are_documented_as_server_sent_events(document: dict[str, Any]) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "text/event-stream" in document["paths"][path]["post"]["responses"]["200"]["content"]


def raw_sse_events(text: str) -> list[dict[str, str]]:
    """The stream's events as WHATWG's parser (and schemathesis) reads them: one dict of fields per blank-line block."""
    events = []
    for block in text.strip().split("\n\n"):
        event: dict[str, str] = {}
        for line in block.splitlines():
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")
        events.append(event)
    return events


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
    ],
)
def test_every_streamed_event_matches_the_documented_event_schema(
    document: dict[str, Any], path: str, body: dict[str, Any]
) -> None:
    """In an OpenAPI 3.1 document an event stream's `schema` describes each event, and a fuzzer checks every event
    against it. No `itemSchema`: with one, 3.2-aware tools validate the whole stream (an array) against `schema`."""
    assert document["openapi"].startswith("3.1")
    media = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "itemSchema" not in media
    request = {"model": MODEL, "stream": True, "max_tokens": 3, **body}
    response = make_client().post(path, json=request)
    assert response.status_code == 200
    events = raw_sse_events(response.text)
    assert len(events) >= 2 and events[-1] == {"data": "[DONE]"}
    for event in events:
        jsonschema.validate(event, media["schema"])
