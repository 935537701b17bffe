"""Schema pieces shared by the completion and chat endpoints: sampling fields, usage, stream options."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from fitserve.server.engine.types import FinishReason, SamplingParams

MAX_N = 16
MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; vLLM-style clients send more, and matching 16 short strings is cheap
MAX_STOP_CHARS = 1024  # per stop string: stop matching scans the tail of the text for each of them
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024  # bounds the per-step work one request can ask of the sampler
LOGIT_BIAS_LIMIT = 100.0  # OpenAI: each bias is in [-100, 100]
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit signed integer

FinishReasonName = Literal["stop", "length"]

StopString = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
UNSUPPORTED_PARAMETER = "unsupported_parameter"


class StrictRequest(BaseModel):
    """Base of every request body: JSON types as OpenAI checks them.

    `"stream": "yes"`, `"n": "2"` or `"max_tokens": 3.0` are 400s, not quietly converted; an integer is still a
    valid number (`"temperature": 1`). NaN and infinities are refused. Unknown fields are ignored, as
    OpenAI-compatible servers do; known fields this server does not implement are refused by name.
    """

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def unsupported(field: str, detail: str = "") -> PydanticCustomError:
    """The validation error for a parameter that would change the answer but is not implemented."""
    message = f"'{field}' is not supported by this server" + (f": {detail}" if detail else "")
    return PydanticCustomError(UNSUPPORTED_PARAMETER, message, {"param": field})  # no braces in `detail`


def reject_unless(field: str, value: Any, accepted: tuple[Any, ...], detail: str = "") -> Any:
    """`value` when it is unset (None) or one of the no-op values in `accepted`; otherwise `unsupported`."""
    if value is None or value in accepted:
        return value
    raise unsupported(field, detail)


class StreamOptions(StrictRequest):
    """`stream_options`: only `include_usage` is meaningful."""

    include_usage: bool = False


class Usage(BaseModel):
    """Token accounting of a response."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class SamplingRequest(StrictRequest):
    """Fields every generation request shares."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0 disables")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"up to {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters each"
    )
    stop_token_ids: list[int] | None = Field(None, description="vLLM extension")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="a 64-bit signed integer")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit before sampling"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    ignore_eos: bool = Field(False, description="vLLM extension")
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop_size(cls, value: object) -> object:
        """Clear messages for the stop caps (the schema states them too)."""
        stops = value if isinstance(value, list) else [value]
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}")
        if any(isinstance(stop, str) and len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"stop sequences are limited to {MAX_STOP_CHARS} characters each")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        """Keys are token ids (decimal strings), values biases in [-100, 100]; at most MAX_LOGIT_BIAS_ENTRIES."""
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} logit_bias entries are supported, got {len(value)}")
        for key, bias in value.items():
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs sorted by id."""
        biases = {int(key): float(bias) for key, bias in (self.logit_bias or {}).items()}  # "07" and "7": one id
        return tuple(sorted(biases.items()))

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingRequest:
        """OpenAI rejects stream_options on non-streaming requests."""
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def stop_sequences(self) -> tuple[str, ...]:
        """The stop strings as a tuple, empty strings dropped."""
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)

    def requested_max_tokens(self) -> int | None:
        """The client's completion-length cap (chat also accepts `max_completion_tokens`)."""
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """Top-k logprobs to ask the engine for; None when not requested."""
        return None

    def to_params(self, default_max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        """Engine parameters for one choice; `seed_offset` makes the n choices of a seeded request differ."""
        requested = self.requested_max_tokens()
        return SamplingParams(
            max_tokens=requested if requested is not None else max(1, default_max_tokens),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=self.stop_sequences(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=self.requested_logprobs(),
            logit_bias=self.logit_bias_pairs(),
        )


def finish_reason_name(reason: FinishReason | None) -> FinishReasonName | None:
    """OpenAI's finish_reason for an engine finish reason (abort/error never reach a successful response)."""
    if reason is None:
        return None
    return "length" if reason is FinishReason.LENGTH else "stop"


def new_id(prefix: str) -> str:
    """A response id such as `cmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    """Unix time in whole seconds, for `created`."""
    return int(time.time())
