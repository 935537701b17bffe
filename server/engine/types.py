"""Plain data passed between the HTTP layer, the engine and the metrics module.

No torch, no HTTP: this module is the seam. The HTTP layer sees only `EngineClient`; the engine emits
`StepStats` / `RequestStats` / `EngineSnapshot` and the metrics module turns them into Prometheus series.
Engine errors name what went wrong; `server.protocol.errors` maps each class to an HTTP status.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class FinishReason(enum.StrEnum):
    """Why a sequence stopped (OpenAI's `finish_reason`, plus engine-side outcomes)."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # client went away or server shut down
    ERROR = "error"  # failed inside the engine (e.g. OOM it could not retry)


class RequestStatus(enum.StrEnum):
    """How a request ended, as counted by `fitserve_requests_total{status}` (`RequestStats.status`)."""

    OK = "ok"  # finished with FinishReason.STOP
    LENGTH = "length"
    ERROR = "error"
    REJECTED = "rejected"  # refused at admission (too long, queue full, invalid)
    ABORTED = "aborted"

    @classmethod
    def of(cls, reason: FinishReason | None) -> RequestStatus:
        """The status of a request that left the engine with `reason` (None: it failed before finishing)."""
        return _STATUS_OF_FINISH.get(reason, cls.ERROR) if reason is not None else cls.ERROR


_STATUS_OF_FINISH = {
    FinishReason.STOP: RequestStatus.OK,
    FinishReason.LENGTH: RequestStatus.LENGTH,
    FinishReason.ERROR: RequestStatus.ERROR,
    FinishReason.ABORT: RequestStatus.ABORTED,
}

# Temperatures below this are greedy: dividing logits by a smaller number only risks overflow (inf/NaN), and
# the distribution is already a point mass on the argmax at any temperature this small.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters, already validated by the HTTP layer."""

    max_tokens: int
    temperature: float = 1.0  # below GREEDY_TEMPERATURE (0 included) means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no top-k filtering
    seed: int | None = None  # None: nondeterministic
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob + top-k alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit) pairs, ids unique

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax (temperature below `GREEDY_TEMPERATURE`)."""
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class SampledToken:
    """A sampled token with its log-probability and top alternatives (empty unless logprobs were asked for)."""

    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SampleFailure:
    """Sampling failed for this one row (e.g. its logits were not finite); only its sequence fails."""

    reason: str


SampleResult = SampledToken | SampleFailure


@dataclass(frozen=True)
class TopLogprob:
    """One alternative token and its log-probability."""

    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a generated token, with the top alternatives when asked for."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """An increment of one request's output. The last one has `finished=True`."""

    request_id: str
    text_delta: str
    token_ids_delta: tuple[int, ...]
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # cumulative
    logprobs_delta: tuple[TokenLogprob, ...] | None = None  # None when logprobs were not requested


class EngineError(Exception):
    """Base of the errors the engine raises to its client (`server.protocol.errors` maps them to HTTP)."""


class InvalidRequestError(EngineError):
    """The request is malformed in a way the HTTP layer did not catch (e.g. an empty prompt)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param  # the request field at fault, when known
        super().__init__(message)


class PromptTooLongError(EngineError):
    """The prompt (plus max_tokens) can never fit the model's context or the KV capacity."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit_tokens: int, what: str) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.limit_tokens = limit_tokens
        super().__init__(
            f"This request needs {prompt_tokens} prompt tokens + {max_tokens} max_tokens = "
            f"{prompt_tokens + max_tokens} tokens, but the {what} is {limit_tokens} tokens."
        )


class QueueFullError(EngineError):
    """The waiting queue cannot take the request (or all of a group's requests); retry later."""

    def __init__(self, max_waiting: int, retry_after_s: int = 1, requested: int = 1) -> None:
        self.retry_after_s = retry_after_s
        what = "this request" if requested == 1 else f"all {requested} requests of this group"
        super().__init__(
            f"The server is at capacity (at most {max_waiting} requests may wait) and cannot queue {what}; retry later."
        )


class EngineOverloadedError(EngineError):
    """The request failed because memory ran out and it could not be retried."""


class RequestFailedError(EngineError):
    """This one request failed inside the engine (sampling, detokenising, or a step that failed with it alone)."""


class EngineUnavailableError(EngineError):
    """The engine is not accepting work (loading, shutting down, or dead)."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request of a group handed to `EngineClient.generate_group`."""

    prompt_token_ids: Sequence[int]
    params: SamplingParams
    request_id: str


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP layer may ask of an engine. Implemented by the real engine and by test fakes."""

    @property
    def model_name(self) -> str:
        """The served model name (`--served-model-name`)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts, in tokens."""
        ...

    @property
    def is_ready(self) -> bool:
        """True once the model is loaded and the engine loop is running."""
        ...

    def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs.

        Raises an `EngineError` subclass before the first output when the request cannot be admitted
        (too long, queue full, engine unavailable). If the consumer stops iterating (client gone), the
        request is aborted and its KV cache freed at the next step.
        """
        ...

    async def generate_group(self, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[RequestOutput]]:
        """Admit several requests as one unit (the choices of one HTTP request), then stream each.

        Either every request is admitted (running, or in the waiting queue) and one output stream per request
        is returned, in order, or none is and the `EngineError` is raised (`QueueFullError` when they do not
        all fit the queue). Each stream aborts its request if the consumer closes it before the end.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown ids are ignored."""
        ...

    async def check_health(self) -> None:
        """Raise `EngineUnavailableError` if the engine loop is dead."""
        ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids with the served model's tokenizer."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids to text."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Messages ([{"role", "content"}]) to prompt token ids through the model's chat template."""
        ...


@dataclass(frozen=True)
class StepStats:
    """Emitted by the engine after every step."""

    batch_size: int  # running sequences in this step
    prefill_tokens: int
    decode_tokens: int
    step_duration_s: float


@dataclass(frozen=True)
class RequestStats:
    """Emitted once per finished (or rejected/aborted/failed) request."""

    status: RequestStatus
    prompt_tokens: int
    generation_tokens: int
    queue_s: float | None  # arrival -> first scheduled
    ttft_s: float | None  # arrival -> first token
    e2e_s: float | None  # arrival -> finished
    inter_token_latencies_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class EngineSnapshot:
    """Gauges read at scrape time; cheap to build, never blocks the engine loop."""

    running: int
    waiting: int
    kv_capacity_tokens: int
    kv_used_tokens: int  # cache slots written and in use (a shared prefix block counts once)
    kv_reserved_tokens: int  # cache slots held by admitted requests (their prompt + max_tokens blocks)
    current_max_batch_size: int  # the cap on running sequences now (lowered after an OOM; the block count if none)
    oom_events_total: int
    preemptions_total: int
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_cache_hits_total: int = 0  # of those, tokens whose KV came from cached blocks


class StatsSink(Protocol):
    """Receives the engine's stats; the metrics module provides the real one, tests a list-backed fake."""

    def record_step(self, stats: StepStats) -> None:
        """Called after every engine step; must be cheap and must not raise."""
        ...

    def record_request(self, stats: RequestStats) -> None:
        """Called once per finished, rejected, aborted or failed request."""
        ...
