"""`/v1/chat/completions` schemas."""

from __future__ import annotations

import enum
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from fitserve.server.protocol.common import (
    MAX_LOGPROBS,
    FinishReasonName,
    SamplingRequest,
    StrictRequest,
    Usage,
    reject_unless,
)


class Role(enum.StrEnum):
    """Message roles the chat template understands."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"


class TextPart(StrictRequest):
    """A text content part (`{"type": "text", "text": ...}`); other part types are not supported."""

    type: Literal["text"]
    text: str


class ChatMessage(StrictRequest):
    """One conversation turn."""

    role: Role = Field(strict=False)  # the enum from its JSON string
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        """Only assistant turns may omit content."""
        if self.content is None and self.role is not Role.ASSISTANT:
            raise ValueError(f"content is required for {self.role.value} messages")
        return self

    def text(self) -> str:
        """The message content as one string (text parts concatenated)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def to_template(self) -> dict[str, str]:
        """The `{"role", "content"}` dict chat templates expect (developer is sent as system)."""
        role = Role.SYSTEM if self.role is Role.DEVELOPER else self.role
        return {"role": role.value, "content": self.text()}


class ChatCompletionRequest(SamplingRequest):
    """A chat completion request."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Parameters that would change the answer and are not implemented: refused by name unless they are no-ops.
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (only an empty list)")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none' is supported")
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, description="not supported (only an empty list)")
    function_call: str | dict[str, Any] | None = Field(None, description="only 'none' is supported")
    modalities: list[str] | None = Field(None, description="only ['text'] is supported")
    audio: dict[str, Any] | None = Field(None, description="not supported")
    prediction: dict[str, Any] | None = Field(None, description="not supported")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported")
    reasoning_effort: str | None = Field(None, description="not supported")

    @field_validator("response_format")
    @classmethod
    def _text_format_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Structured output (json_object, json_schema) is not implemented."""
        return reject_unless("response_format", value, ({"type": "text"},), "only type 'text'")

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None, info: Any) -> list[dict[str, Any]] | None:
        """Tool and function calling are not implemented."""
        return reject_unless(info.field_name, value, ([],))

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None, info: Any) -> str | dict[str, Any] | None:
        """Only 'none' (no tool call) is possible."""
        return reject_unless(info.field_name, value, ("none",), "only 'none'")

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        """The model writes text."""
        return reject_unless("modalities", value, (["text"],), "only ['text']")

    @field_validator("audio", "prediction", "web_search_options", "reasoning_effort")
    @classmethod
    def _not_implemented(cls, value: Any, info: Any) -> Any:
        """Refused whenever given."""
        return reject_unless(info.field_name, value, ())

    @model_validator(mode="after")
    def _check_options(self) -> ChatCompletionRequest:
        """top_logprobs needs logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (new name) wins over `max_tokens` (deprecated name)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        """0 alternatives when only `logprobs` is set; None when not requested."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def template_messages(self) -> list[dict[str, str]]:
        """Messages ready for the engine's chat template."""
        return [message.to_template() for message in self.messages]


class TopLogprobEntry(BaseModel):
    """One alternative token in chat logprobs."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobEntry(TopLogprobEntry):
    """The logprob of one generated token with its alternatives."""

    top_logprobs: list[TopLogprobEntry] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """`choice.logprobs` of a chat response."""

    content: list[LogprobEntry] | None = None
    refusal: list[LogprobEntry] | None = None


class AssistantMessage(BaseModel):
    """The generated message of a non-streaming choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    """One generated message."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionResponse(BaseModel):
    """The body of a non-streaming chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    """A streamed increment; fields left None are omitted on the wire."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One choice's increment in a streamed chunk."""

    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def to_json(self) -> str:
        """JSON for the wire: null fields inside `delta` are dropped, the rest kept as OpenAI does."""
        body = self.model_dump(mode="json")
        for choice in body["choices"]:
            choice["delta"] = {key: value for key, value in choice["delta"].items() if value is not None}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))
