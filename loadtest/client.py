"""An async OpenAI-compatible HTTP client that times each request (TTFT, inter-token latency, end to end).

Streams over Server-Sent Events with httpx: reads `data:` lines until `[DONE]`, counts content chunks, and
takes the token counts from the usage chunk (`stream_options.include_usage`) when the server sends one.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from fitserve.loadtest.workload import Endpoint, WorkItem

logger = logging.getLogger(__name__)


class ErrorKind(enum.StrEnum):
    """How a request failed."""

    HTTP = "http"  # the server answered with a 4xx/5xx status
    CONNECTION = "connection"  # could not connect, or the connection broke mid-stream
    TIMEOUT = "timeout"  # no answer within the request timeout
    PROTOCOL = "protocol"  # a malformed answer, or an error event inside the stream


@dataclass
class RequestResult:
    """The outcome and timings of one request. Times are seconds; `start_s` is on `time.perf_counter`."""

    index: int
    start_s: float
    ok: bool = False
    status_code: int | None = None
    error_kind: ErrorKind | None = None
    error_message: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    chunks: int = 0

    @property
    def failure_key(self) -> str | None:
        """How the failure is counted: the HTTP status (`"429"`) or the error kind (`"connection"`)."""
        if self.ok:
            return None
        if self.error_kind is ErrorKind.HTTP and self.status_code is not None:
            return str(self.status_code)
        return (self.error_kind or ErrorKind.PROTOCOL).value


class OpenAIClient:
    """Sends work items to one OpenAI-compatible server. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        endpoint: Endpoint = Endpoint.CHAT,
        api_key: str | None = None,
        stream: bool = True,
        request_timeout_s: float = 120.0,
        extra_body: dict[str, Any] | None = None,
        max_connections: int = 1024,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.endpoint = endpoint
        self.stream = stream
        self.request_timeout_s = request_timeout_s
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(request_timeout_s), limits=limits
        )

    async def __aenter__(self) -> OpenAIClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def resolve_model(self) -> str:
        """The model to ask for: the one given, else the first id `GET /v1/models` lists."""
        if self.model:
            return self.model
        try:
            resp = await self._http.get("/v1/models")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise RuntimeError(f"cannot list models at {self.base_url}/v1/models ({exc}); is the server up?") from exc
        data = resp.json().get("data") or []
        if not data:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass --model")
        self.model = str(data[0]["id"])
        return self.model

    async def get_text(self, url: str, timeout_s: float = 5.0) -> tuple[int, str]:
        """GET an absolute or server-relative URL; returns (status, body text)."""
        resp = await self._http.get(url, timeout=timeout_s)
        return resp.status_code, resp.text

    async def send(self, item: WorkItem) -> RequestResult:
        """Send one request and time it. Never raises for server or network failures: they go in the result."""
        body = item.body(self.endpoint, self.model or "", self.stream, self.extra_body)
        result = RequestResult(index=item.index, start_s=time.perf_counter())
        try:
            async with asyncio.timeout(self.request_timeout_s):  # a total bound; httpx's is per read
                if self.stream:
                    await self._send_streaming(body, result)
                else:
                    await self._send_plain(body, result)
        except TimeoutError:
            _fail(result, ErrorKind.TIMEOUT, f"no complete answer within {self.request_timeout_s:g} s")
        except httpx.TimeoutException as exc:
            _fail(result, ErrorKind.TIMEOUT, f"timed out: {exc!r}")
        except (httpx.TransportError, httpx.StreamError) as exc:
            _fail(result, ErrorKind.CONNECTION, f"{type(exc).__name__}: {exc}")
        except (ValueError, KeyError, TypeError) as exc:  # bad JSON or an unexpected shape
            _fail(result, ErrorKind.PROTOCOL, f"malformed response: {exc!r}")
        result.e2e_s = time.perf_counter() - result.start_s
        return result

    async def _send_plain(self, body: dict[str, Any], result: RequestResult) -> None:
        resp = await self._http.post(self.endpoint.path, json=body)
        result.status_code = resp.status_code
        if resp.status_code >= 400:
            _fail(result, ErrorKind.HTTP, _error_message(resp.text))
            return
        payload = resp.json()
        usage = payload.get("usage") or {}
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = usage.get("prompt_tokens")
        result.ttft_s = None  # not observable without streaming
        result.ok = True

    async def _send_streaming(self, body: dict[str, Any], result: RequestResult) -> None:
        async with self._http.stream("POST", self.endpoint.path, json=body) as resp:
            result.status_code = resp.status_code
            if resp.status_code >= 400:
                _fail(result, ErrorKind.HTTP, _error_message((await resp.aread()).decode("utf-8", "replace")))
                return
            last_chunk_s: float | None = None
            usage: dict[str, Any] | None = None
            done = False  # `[DONE]` seen, or every choice got a finish_reason (some servers send no `[DONE]`)
            finished = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if event.get("error"):
                    _fail(result, ErrorKind.PROTOCOL, _error_message(json.dumps(event)))
                    return
                usage = event.get("usage") or usage
                finished = finished or any(c.get("finish_reason") for c in event.get("choices") or [])
                if _has_content(event, self.endpoint):
                    now = time.perf_counter()
                    if last_chunk_s is None:
                        result.ttft_s = now - result.start_s
                    else:
                        result.itl_s.append(now - last_chunk_s)
                    last_chunk_s = now
                    result.chunks += 1
            if not (done or finished):
                _fail(result, ErrorKind.CONNECTION, "stream ended without [DONE] or a finish_reason")
                return
        if usage and usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
            result.prompt_tokens = usage.get("prompt_tokens")
        else:
            result.output_tokens = result.chunks
        result.ok = True


def normalize_base_url(url: str) -> str:
    """The server root: strips a trailing slash and a trailing `/v1` so `/v1/...` paths can be appended."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _has_content(event: dict[str, Any], endpoint: Endpoint) -> bool:
    for choice in event.get("choices") or []:
        if endpoint is Endpoint.CHAT:
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                return True
        elif choice.get("text"):
            return True
    return False


def _fail(result: RequestResult, kind: ErrorKind, message: str) -> None:
    result.ok = False
    result.error_kind = kind
    result.error_message = message[:500]
    logger.debug("request %d failed (%s): %s", result.index, kind.value, result.error_message)


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500]
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or text)[:500]
