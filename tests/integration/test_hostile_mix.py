"""Acceptance (issue 13): a hostile mix next to a good stream. One client streams a greedy completion while
others send, at the same moment, every kind of bad or abusive request we know of. Each hostile request is
served or gets an OpenAI-style 4xx (never a 5xx); the greedy stream's text equals its solo run; the server's
RSS after the mix is within 5% of before; `/health` is 200.

The server runs fp32: on CPUs with native bf16 (AVX512-BF16) a bf16 matmul's rounding depends on how many rows
the batch has, so a greedy bf16 stream can legitimately flip a near-tied token when strangers share its batch
(tests/integration/test_engine_equivalence.py measures that). The guarantee tested here is isolation, not
batch-invariant arithmetic.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.live_server import live_server

pytestmark = pytest.mark.integration

SERVED = "smol"
MIB = 1 << 20
GOOD = {
    "model": SERVED,
    "prompt": "The three primary colours are",
    "max_tokens": 32,
    "temperature": 0,
    "stream": True,
}


def listening_pid(base_url: str) -> int:
    """The PID of the process listening on the server's port (the server itself)."""
    port = int(base_url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise AssertionError(f"no process listens on port {port}")


async def stream_text(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    """Run one streaming completion to its end and join the text of its chunks."""
    parts: list[str] = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            parts.append(chunk["choices"][0]["text"])
    return "".join(parts)


def hostile_requests() -> list[tuple[str, str, bytes | dict[str, Any], int | None]]:
    """(name, path, JSON body or raw bytes, the status it must get or None) for each hostile request."""
    completion = {"model": SERVED, "prompt": "Hello", "max_tokens": 2}
    chat = {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return [
        ("tiny temperature", "/v1/completions", {**completion, "temperature": 1e-300}, 200),
        ("tiny temperature chat", "/v1/chat/completions", {**chat, "temperature": 5e-324}, 200),
        ("huge seed", "/v1/completions", {**completion, "seed": 2**70, "temperature": 1.0}, 400),
        ("negative huge seed", "/v1/chat/completions", {**chat, "seed": -(2**80)}, 400),
        ("extreme penalties", "/v1/completions", {**completion, "presence_penalty": 2, "frequency_penalty": -2}, 200),
        ("NaN penalty", "/v1/completions", b'{"model": "smol", "prompt": "Hi", "presence_penalty": NaN}', 400),
        ("Infinity temperature", "/v1/completions", b'{"model": "smol", "prompt": "Hi", "temperature": Infinity}', 400),
        ("extreme logit bias", "/v1/completions", {**completion, "logit_bias": {"0": 100, "1": -100}}, 200),
        ("1 MiB stop string", "/v1/completions", {**completion, "stop": ["x" * (MIB - 300)]}, 400),
        ("many stop strings", "/v1/chat/completions", {**chat, "stop": [f"s{i}" for i in range(1000)]}, 400),
        ("max prompts x n", "/v1/completions", {**completion, "prompt": list("abcd"), "n": 16, "max_tokens": 1}, None),
        ("over prompts x n", "/v1/completions", {**completion, "prompt": [[1]] * 4096, "n": 16}, 400),
        ("1 MiB tokenize", "/tokenize", {"model": SERVED, "prompt": "word " * ((MIB - 300) // 5)}, None),
        ("1 MiB tokenize again", "/tokenize", {"model": SERVED, "prompt": "ab " * ((MIB - 300) // 3)}, None),
        ("malformed JSON", "/v1/completions", b'{"model": "smol", "prompt": ', 400),
        ("wrong types", "/v1/completions", {**completion, "max_tokens": "3", "n": "2"}, 400),
        ("unknown model", "/v1/chat/completions", {**chat, "model": "no-such-model"}, 404),
        ("huge max_tokens", "/v1/completions", {**completion, "max_tokens": 10**12}, 400),
    ]


async def send_hostile(
    client: httpx.AsyncClient, name: str, path: str, body: bytes | dict[str, Any], expected: int | None
) -> str:
    """Send one hostile request: it gets `expected`, or (None) is served or refused with an OpenAI-style 4xx."""
    start = time.monotonic()
    if isinstance(body, bytes):
        response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = await client.post(path, json=body)
    assert response.status_code < 500, f"{name}: {response.status_code} {response.text[:500]}"
    if expected is not None:
        assert response.status_code == expected, f"{name}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        error = response.json().get("error")
        assert isinstance(error, dict) and error.get("message"), f"{name}: not an OpenAI error: {response.text[:500]}"
    return f"{name}: {response.status_code} after {time.monotonic() - start:.1f} s"


async def disconnect_mid_stream(client: httpx.AsyncClient, index: int) -> str:
    """Start a long stream and drop the connection after its first chunk."""
    body = {"model": SERVED, "prompt": f"Story {index}: once upon a time", "max_tokens": 64, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code in (200, 429), await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
    return f"disconnect {index}: dropped"


async def run_mix(base_url: str) -> tuple[str, list[str]]:
    """The good stream and every hostile request at once; returns the stream's text and the hostile outcomes."""
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        good = asyncio.create_task(stream_text(client, GOOD))
        await asyncio.sleep(0.2)  # the good stream is running when the mix arrives
        hostile = [send_hostile(client, *request) for request in hostile_requests()]
        hostile += [disconnect_mid_stream(client, i) for i in range(4)]
        outcomes = await asyncio.gather(*hostile)
        return await good, list(outcomes)


async def solo_text(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return await stream_text(client, GOOD)


def test_greedy_stream_survives_the_hostile_mix(default_model_dir: Path) -> None:
    args = ["--model", str(default_model_dir), "--served-model-name", SERVED, "--precision", "fp32"]
    args += ["--max-model-len", "1024", "--max-batch-size", "8"]
    with live_server(args) as base_url:
        server = psutil.Process(listening_pid(base_url))
        solo = asyncio.run(solo_text(base_url))
        assert solo.strip(), "the solo run produced no text"
        asyncio.run(solo_text(base_url))  # warm every path the mix takes once more before measuring RSS
        rss_before = server.memory_info().rss
        mixed, outcomes = asyncio.run(run_mix(base_url))
        print("\n".join(outcomes))
        assert mixed == solo, f"the greedy stream changed next to the hostile mix:\nsolo:  {solo!r}\nmixed: {mixed!r}"
        assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200
        assert asyncio.run(solo_text(base_url)) == solo  # and it still serves the same answer afterwards
        time.sleep(1.0)  # the engine hands its freed heap back when it goes idle, right after the last output
        rss_after = server.memory_info().rss
        print(f"RSS before the mix {rss_before / MIB:.1f} MiB, after {rss_after / MIB:.1f} MiB")
        assert rss_after <= rss_before * 1.05, f"RSS grew from {rss_before / MIB:.1f} to {rss_after / MIB:.1f} MiB"
