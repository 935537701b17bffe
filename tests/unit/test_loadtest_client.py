"""The streaming client against a real-socket fake server: timings, token counts, failure classification."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fitserve.loadtest.client import ErrorKind, OpenAIClient, RequestResult, normalize_base_url
from fitserve.loadtest.workload import Endpoint, LengthSpec, Workload
from tests.loadtest_fakes import FakeBehaviour, create_fake_app, serve_in_thread

pytestmark = pytest.mark.timeout(30)

WORKLOAD = Workload(max_tokens=LengthSpec(5, 5), prompt_words=LengthSpec(8, 8))


def _send(url: str, endpoint: Endpoint = Endpoint.CHAT, stream: bool = True, timeout_s: float = 10.0) -> RequestResult:
    async def go() -> RequestResult:
        async with OpenAIClient(url + "/v1/", None, endpoint=endpoint, stream=stream, request_timeout_s=timeout_s) as c:
            assert await c.resolve_model() == "fake-model"
            return await c.send(WORKLOAD.item(0))

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_streaming_timings_and_usage(endpoint: Endpoint) -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(ttft_s=0.05, token_delay_s=0.02))) as url:
        r = _send(url, endpoint)
    assert r.ok and r.status_code == 200 and r.failure_key is None
    assert r.output_tokens == 5 and r.prompt_tokens == 20 and r.chunks == 5
    assert len(r.itl_s) == 4 and sum(r.itl_s) >= 0.06  # 4 gaps of 20 ms at the server (reads may coalesce)
    assert r.ttft_s is not None and 0.04 <= r.ttft_s < r.e2e_s


def test_without_usage_chunk_counts_content_chunks() -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(send_usage=False))) as url:
        r = _send(url)
    assert r.ok and r.output_tokens == 5 and r.prompt_tokens is None


def test_stream_without_done_but_with_finish_reason_is_complete() -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(send_done=False))) as url:
        r = _send(url)
    assert r.ok and r.output_tokens == 5


def test_non_streaming() -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour())) as url:
        r = _send(url, stream=False)
    assert r.ok and r.output_tokens == 5 and r.ttft_s is None and r.itl_s == []


def test_failures_are_classified() -> None:
    with serve_in_thread(create_fake_app(FakeBehaviour(reject_above=0, reject_status=429))) as url:
        r = _send(url)
    assert not r.ok and r.failure_key == "429" and r.error_message == "planted overload"
    with serve_in_thread(create_fake_app(FakeBehaviour(truncate_stream=True))) as url:
        r = _send(url)
    assert not r.ok and r.error_kind is ErrorKind.CONNECTION and "[DONE]" in (r.error_message or "")
    assert r.chunks == 4
    with serve_in_thread(create_fake_app(FakeBehaviour(ttft_s=2.0))) as url:

        async def slow() -> RequestResult:
            async with OpenAIClient(url, "fake-model", request_timeout_s=0.3) as c:
                return await c.send(WORKLOAD.item(0))

        r = asyncio.run(slow())
    assert not r.ok and r.failure_key == "timeout" and r.chunks == 0  # gave up before the 2 s first token


def test_connection_refused() -> None:
    with socket.socket() as sock:  # bound, never listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        async def go() -> RequestResult:
            async with OpenAIClient(f"http://127.0.0.1:{port}", "m", request_timeout_s=5) as c:
                return await c.send(WORKLOAD.item(0))

        r = asyncio.run(go())
    assert not r.ok and r.failure_key == "connection"


def test_normalize_base_url() -> None:
    assert normalize_base_url("http://h:1/v1/") == "http://h:1"
    assert normalize_base_url("http://h:1") == "http://h:1"
