"""`--api-key` protects every route but the probes; /metrics is open unless `metrics_require_key`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes.routes import MODEL, assert_openai_error, make_client

KEY = {"Authorization": "Bearer sekret"}


class FakeMetrics:
    def render(self) -> tuple[bytes, str]:
        return b"fitserve_up 1\n", "text/plain; version=0.0.4"


PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hi"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [104, 105]}),
    ("GET", "/openapi.json", None),
    ("GET", "/v1/models", None),
    ("GET", "/no/such/route", None),  # 401 before 404: an unauthenticated scan learns nothing
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
def test_routes_beyond_v1_need_the_key(method: str, path: str, body: dict[str, Any] | None) -> None:
    client = make_client(api_key="sekret")
    assert_openai_error(client.request(method, path, json=body), 401, "invalid_api_key")
    authorised = client.request(method, path, json=body, headers=KEY)
    assert authorised.status_code == (404 if path == "/no/such/route" else 200), authorised.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/version"])
def test_probes_stay_open(path: str) -> None:
    assert make_client(api_key="sekret").get(path).status_code == 200


def test_metrics_open_by_default_and_keyed_on_request() -> None:
    assert make_client(metrics=FakeMetrics(), api_key="sekret").get("/metrics").status_code == 200
    keyed = make_client(metrics=FakeMetrics(), api_key="sekret", metrics_require_key=True)
    assert_openai_error(keyed.get("/metrics"), 401, "invalid_api_key")
    assert keyed.get("/metrics", headers=KEY).text == "fitserve_up 1\n"


def test_the_scale_out_scrape_target_list_is_open_like_metrics() -> None:
    """/metrics/targets (the Ray ingress's Prometheus http_sd list): no 401 by default (here 404, no such route)."""
    assert make_client(api_key="sekret").get("/metrics/targets").status_code == 404
    keyed = make_client(api_key="sekret", metrics_require_key=True)
    assert_openai_error(keyed.get("/metrics/targets"), 401, "invalid_api_key")


def test_without_a_key_everything_is_open() -> None:
    client = make_client()
    assert client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 200
    assert client.get("/openapi.json").status_code == 200
