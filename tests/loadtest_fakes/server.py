"""A small FastAPI app that speaks the OpenAI streaming protocol and misbehaves on purpose above a planted load.

Each request streams `max_tokens` one-word chunks `token_delay_s` apart, then a usage chunk and `[DONE]`.
What happens above the planted capacity is chosen by `FakeBehaviour`; `in_flight` counts requests from
arrival to the end of their stream. With `fitserve_metrics`, `/metrics` exposes fitserve-named series.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class FakeBehaviour:
    """What the fake does. Each `*_above` triggers when more than that many requests are in flight on arrival."""

    token_delay_s: float = 0.02
    ttft_s: float = 0.05
    reject_above: int | None = None  # answer `reject_status` instead of streaming
    reject_status: int = 503
    slow_ttft_above: int | None = None  # more in flight at any time before its first token: add `slow_ttft_s`
    slow_ttft_s: float = 0.2
    max_batch_size: int | None = None  # at most this many stream at once; the rest wait (queue)
    oom_above: int | None = None  # count an OOM event (the request still succeeds)
    fitserve_metrics: bool = False
    kv_capacity_tokens: int = 4096
    memory_budget_bytes: int = 2 * 1024**3
    prompt_tokens: int = 20
    send_usage: bool = True  # the usage chunk of stream_options.include_usage
    truncate_stream: bool = False  # end the stream before the last token: no finish_reason, no `[DONE]`
    send_done: bool = True  # False: like `transformers serve`, end after the finish_reason chunk


@dataclass(eq=False)  # compared by identity: removed from `FakeState.prefilling` by `is`
class _Prefill:
    peak: int


@dataclass
class FakeState:
    """Live counters of the fake (read by /metrics and by the tests)."""

    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    oom_events: int = 0
    generated_tokens: int = 0
    max_in_flight: int = 0
    statuses: list[int] = field(default_factory=list)
    # Requests before their first token, each with the most requests in flight it has seen so far.
    prefilling: list[_Prefill] = field(default_factory=list)


def create_fake_app(behaviour: FakeBehaviour) -> FastAPI:
    """The fake server app; `app.state.fake` is its `FakeState`."""
    app = FastAPI()
    state = FakeState()
    app.state.fake = state
    gate = asyncio.Semaphore(behaviour.max_batch_size) if behaviour.max_batch_size else None

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        if not behaviour.fitserve_metrics:
            return PlainTextResponse("# no fitserve metrics here\nother_metric 1.0\n")
        return PlainTextResponse(_exposition(behaviour, state))

    async def handle(request: Request, chat: bool) -> StreamingResponse | JSONResponse:
        body = await request.json()
        max_tokens = int(body.get("max_tokens") or 16)
        arrived_with = state.in_flight + 1
        if behaviour.reject_above is not None and arrived_with > behaviour.reject_above:
            state.statuses.append(behaviour.reject_status)
            return JSONResponse(
                {"error": {"message": "planted overload", "type": "server_error", "param": None, "code": "overloaded"}},
                status_code=behaviour.reject_status,
            )
        if behaviour.oom_above is not None and arrived_with > behaviour.oom_above:
            state.oom_events += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        for other in state.prefilling:
            other.peak = max(other.peak, state.in_flight)
        state.statuses.append(200)
        if not body.get("stream"):
            state.in_flight -= 1
            text = "".join(f" w{i}" for i in range(max_tokens))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            )
            usage = {"prompt_tokens": behaviour.prompt_tokens, "completion_tokens": max_tokens}
            return JSONResponse({"choices": [choice], "usage": usage})
        return StreamingResponse(_stream(behaviour, state, gate, chat, max_tokens), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


async def _stream(
    b: FakeBehaviour, state: FakeState, gate: asyncio.Semaphore | None, chat: bool, max_tokens: int
) -> AsyncIterator[str]:
    """The SSE events of one request. Counters are released before the closing events, so a client that
    sends its next request on `[DONE]` never overlaps with its previous one in `in_flight`."""
    held = {"in_flight": True, "running": False}
    prefill = _Prefill(peak=state.in_flight)
    state.prefilling.append(prefill)

    def release() -> None:
        if held["running"]:
            state.running -= 1
            if gate is not None:
                gate.release()
            held["running"] = False
        if held["in_flight"]:
            state.in_flight -= 1
            held["in_flight"] = False

    try:
        if gate is not None:
            state.waiting += 1
            try:
                await gate.acquire()
            finally:
                state.waiting -= 1
        state.running += 1
        held["running"] = True
        await asyncio.sleep(b.ttft_s)
        if b.slow_ttft_above is not None and prefill.peak > b.slow_ttft_above:
            await asyncio.sleep(b.slow_ttft_s)  # "prefill" of an overloaded batch
        state.prefilling.remove(prefill)
        for i in range(max_tokens):
            if i:
                await asyncio.sleep(b.token_delay_s)
            if b.truncate_stream and i == max_tokens - 1:
                release()
                return
            state.generated_tokens += 1
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
            choice["finish_reason"] = "length" if i == max_tokens - 1 else None
            yield f"data: {json.dumps({'choices': [choice]})}\n\n"
        release()
        if b.send_usage:
            usage = {
                "prompt_tokens": b.prompt_tokens,
                "completion_tokens": max_tokens,
                "total_tokens": b.prompt_tokens + max_tokens,
            }
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        if b.send_done:
            yield "data: [DONE]\n\n"
    finally:
        if prefill in state.prefilling:
            state.prefilling.remove(prefill)
        release()


def _exposition(b: FakeBehaviour, s: FakeState) -> str:
    used = s.running * (b.prompt_tokens + 16)
    lines = [
        "# TYPE fitserve_memory_budget_bytes gauge",
        f'fitserve_memory_budget_bytes{{device="cpu"}} {b.memory_budget_bytes}',
        "# TYPE fitserve_device_memory_used_bytes gauge",
        f'fitserve_device_memory_used_bytes{{device="cpu"}} {b.memory_budget_bytes // 2 + s.running * 1024**2}',
        "# TYPE fitserve_kv_cache_capacity_tokens gauge",
        f"fitserve_kv_cache_capacity_tokens {b.kv_capacity_tokens}",
        "# TYPE fitserve_kv_cache_used_tokens gauge",
        f"fitserve_kv_cache_used_tokens {used}",
        "# TYPE fitserve_kv_cache_usage_ratio gauge",
        f"fitserve_kv_cache_usage_ratio {used / b.kv_capacity_tokens}",
        "# TYPE fitserve_requests_running gauge",
        f"fitserve_requests_running {s.running}",
        "# TYPE fitserve_requests_waiting gauge",
        f"fitserve_requests_waiting {s.waiting}",
        "# TYPE fitserve_engine_current_max_batch_size gauge",
        f"fitserve_engine_current_max_batch_size {b.max_batch_size or 256}",
        "# TYPE fitserve_oom_events_total counter",
        f"fitserve_oom_events_total {s.oom_events}",
        "# TYPE fitserve_preemptions_total counter",
        "fitserve_preemptions_total 0",
        "# TYPE fitserve_generation_tokens_total counter",
        f"fitserve_generation_tokens_total {s.generated_tokens}",
    ]
    return "\n".join(lines) + "\n"


@contextmanager
def serve_in_thread(app: FastAPI, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Run `app` with uvicorn on a free 127.0.0.1 port in a daemon thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
