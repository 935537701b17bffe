"""Tokenising, templating and detokenising run on the bounded CPU pool, not on the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from fitserve.server.protocol.errors import APIError
from fitserve.server.serving.cpu_pool import LARGE_LANE_NICE, CPULanes, CPUWorkPool
from tests.fakes import FakeEngine
from tests.fakes.routes import MODEL, assert_openai_error, make_client


class ThreadRecordingEngine(FakeEngine):
    """Records the thread each tokenizer call ran on."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL)
        self.threads: list[str] = []

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return super().tokenize(text, add_special_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        self.threads.append(threading.current_thread().name)
        return super().detokenize(token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return super().apply_chat_template(messages, add_generation_prompt)


@pytest.mark.parametrize(
    ("path", "body", "calls"),
    [
        ("/tokenize", {"model": MODEL, "prompt": "hi"}, 1),
        ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, 1),
        ("/detokenize", {"model": MODEL, "tokens": [104, 105]}, 1),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True, "max_tokens": 1}, 2),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}, 1),
    ],
)
def test_tokenizer_work_runs_on_the_pool_threads(path: str, body: dict[str, object], calls: int) -> None:
    engine = ThreadRecordingEngine()
    response = make_client(engine).post(path, json=body)
    assert response.status_code == 200, response.text
    assert len(engine.threads) >= calls  # the fake's chat template tokenizes too
    assert all(name.startswith("fitserve-cpu") for name in engine.threads), engine.threads


def test_a_full_backlog_is_429_with_retry_after_and_frees_up() -> None:
    async def scenario() -> None:
        pool = CPUWorkPool(workers=1, max_queued=1)
        release = threading.Event()
        running = [asyncio.ensure_future(pool.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert pool.in_flight == 2
        with pytest.raises(APIError) as refused:
            await pool.run(len, "x")
        assert refused.value.status_code == 429 and refused.value.headers["Retry-After"] == "1"
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        await asyncio.sleep(0.05)
        assert pool.in_flight == 0
        assert await pool.run(len, "abc") == 3
        pool.close()

    asyncio.run(scenario())


def test_a_cancelled_caller_keeps_its_slot_until_the_thread_is_done() -> None:
    async def scenario() -> None:
        pool = CPUWorkPool(workers=1, max_queued=0)
        release = threading.Event()
        caller = asyncio.ensure_future(pool.run(release.wait, 10))
        await asyncio.sleep(0.05)
        caller.cancel()  # the client went away; the thread still works on it
        await asyncio.sleep(0.05)
        with pytest.raises(APIError):
            await pool.run(len, "x")
        release.set()
        for _ in range(100):
            if pool.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert await pool.run(len, "ab") == 2
        pool.close()

    asyncio.run(scenario())


def test_the_http_answer_when_the_pool_is_full() -> None:
    client = make_client(tokenizer_workers=1, tokenizer_max_queued=0)
    pool = client.app.state.server.cpu_lanes.small  # type: ignore[attr-defined]
    pool.in_flight = pool.capacity  # as if one /tokenize were running
    response = client.post("/tokenize", json={"model": MODEL, "prompt": "hi"})
    assert_openai_error(response, 429, "server_busy")
    assert response.headers["retry-after"] == "1"


class GatedEngine(FakeEngine):
    """Its tokenizer blocks on texts longer than 1000 characters until `gate` is set (a huge prompt in progress)."""

    def __init__(self) -> None:
        super().__init__(model_name=MODEL)
        self.gate = threading.Event()
        self.big_started = threading.Event()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 1000:
            self.big_started.set()
            assert self.gate.wait(30)
        return super().tokenize(text, add_special_tokens)


def test_small_requests_are_not_queued_behind_large_bodies() -> None:
    """With the large lane's one thread busy on a big body and more big bodies queued behind it, a small request is
    tokenized at once on the other lane (one FIFO pool made it wait for every big body before it)."""
    engine = GatedEngine()
    client = make_client(engine, tokenizer_workers=1, tokenizer_large_body_bytes=4096)
    big = {"model": MODEL, "prompt": "x" * 8192}
    with ThreadPoolExecutor(4) as executor:
        bigs = [executor.submit(client.post, "/tokenize", json=big) for _ in range(3)]
        assert engine.big_started.wait(10)
        small = client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}, timeout=10)
        assert small.status_code == 200 and small.json()["count"] > 0
        lanes = client.app.state.server.cpu_lanes  # type: ignore[attr-defined]
        assert lanes.large.in_flight == 3  # the big ones are all still there
        engine.gate.set()
        assert [f.result(timeout=30).status_code for f in bigs] == [200, 200, 200]


def test_the_lane_follows_the_declared_body_length() -> None:
    lanes = CPULanes(workers=1, max_queued=1, large_workers=1, large_body_bytes=100)
    assert lanes.for_body(100) is lanes.small
    assert lanes.for_body(101) is lanes.large
    assert lanes.for_body(None) is lanes.large  # chunked: the length is unknown until it has been read
    lanes.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread priorities are a POSIX/Linux feature")
def test_the_large_lane_runs_at_the_lowest_cpu_priority() -> None:
    """A thread tokenising a 1 MiB prompt must not take a core from the engine: it runs at nice 19, the small lane
    at the process's own priority."""

    def my_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def scenario() -> tuple[int, int]:
        lanes = CPULanes(workers=1, max_queued=0, large_workers=1, large_body_bytes=10)
        try:
            return await lanes.small.run(my_nice), await lanes.large.run(my_nice)
        finally:
            lanes.close()

    small, large = asyncio.run(scenario())
    assert small == os.getpriority(os.PRIO_PROCESS, 0)
    assert large == LARGE_LANE_NICE == 19
