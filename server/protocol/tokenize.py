"""`/tokenize` and `/detokenize` schemas (vLLM-compatible shapes)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from fitserve.server.protocol.chat import ChatMessage
from fitserve.server.protocol.common import StrictRequest


class TokenizeRequest(StrictRequest):
    """Either a `prompt` (text) or `messages` (rendered through the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        """Exactly one of prompt and messages."""
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    """Token ids of the input."""

    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(StrictRequest):
    """Token ids to turn back into text."""

    model: str | None = None
    tokens: list[int] = Field(description="token ids")

    @model_validator(mode="after")
    def _non_negative(self) -> DetokenizeRequest:
        """Token ids are non-negative."""
        if any(token < 0 for token in self.tokens):
            raise ValueError("token ids must be non-negative")
        return self


class DetokenizeResponse(BaseModel):
    """The decoded text."""

    prompt: str
