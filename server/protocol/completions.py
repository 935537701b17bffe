"""`/v1/completions` schemas."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from fitserve.server.protocol.common import MAX_LOGPROBS, FinishReasonName, SamplingRequest, Usage, unsupported

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    """A legacy completion request; `prompt` may be text, a list of texts, token ids or lists of token ids."""

    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="not supported (only empty)")
    best_of: int | None = Field(None, ge=1, description="only equal to n")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Prompt) -> Prompt:
        """Reject empty prompt lists and empty token-id lists (an empty string is allowed)."""
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(item, list) and not item for item in value):
                raise ValueError("token id lists in prompt must not be empty")
            if any(isinstance(item, int) and item < 0 for item in value):
                raise ValueError("token ids must be non-negative")
        return value

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        """Options this server does not implement are rejected rather than silently ignored."""
        if self.suffix:
            raise unsupported("suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise unsupported("best_of", "only best_of equal to n (use n)")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported (prompt logprobs are not computed)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each item is a text or a token-id list."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [list(value)]  # type: ignore[arg-type]
        return list(value)  # type: ignore[arg-type]

    def requested_logprobs(self) -> int | None:
        """`logprobs` is already the number of alternatives."""
        return self.logprobs


class CompletionLogprobs(BaseModel):
    """Legacy logprobs layout: parallel lists per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """One generated text."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class CompletionResponse(BaseModel):
    """The body of a non-streaming completion, and of each streamed chunk (`usage` set only where due)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
