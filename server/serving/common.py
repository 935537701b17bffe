"""Helpers shared by the serving classes: model check, prompt validation, per-choice accumulation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fitserve.server.engine.types import EngineClient, FinishReason, RequestOutput, TokenLogprob
from fitserve.server.protocol.common import SamplingRequest
from fitserve.server.protocol.errors import APIError


def check_model(engine: EngineClient, requested: str | None) -> None:
    """404 `model_not_found` unless `requested` is the served model name (None is accepted where optional)."""
    if requested is not None and requested != engine.model_name:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{engine.model_name}'.",
            code="model_not_found",
            param="model",
        )


def check_token_ids(engine: EngineClient, token_ids: Sequence[int], param: str) -> None:
    """400 if a token id is outside the vocabulary (when the engine tells its vocabulary size)."""
    vocab_size = getattr(engine, "vocab_size", None)
    if not isinstance(vocab_size, int):
        return
    bad = [token for token in token_ids if not 0 <= token < vocab_size]
    if bad:
        raise APIError.invalid(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})", param=param)


def check_choices(num_prompts: int, n: int, max_choices: int) -> None:
    """400 when prompts x n exceeds the per-request cap (`--max-choices-per-request`); checked before any work."""
    if num_prompts * n > max_choices:
        raise APIError.invalid(
            f"this request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} choices; "
            f"at most {max_choices} are allowed per request",
            param="n" if num_prompts == 1 else "prompt",
        )


def check_logit_bias(engine: EngineClient, request: SamplingRequest) -> None:
    """400 naming `logit_bias` if one of its token ids is outside the vocabulary."""
    check_token_ids(engine, [token for token, _ in request.logit_bias_pairs()], param="logit_bias")


def tokenize_text(engine: EngineClient, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize with the engine's tokenizer; tokenizer failures are the input's fault (400)."""
    try:
        return engine.tokenize(text, add_special_tokens=add_special_tokens)
    except Exception as error:
        raise APIError.invalid(f"could not tokenize the input: {error}", param="prompt") from error


def render_chat(engine: EngineClient, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Apply the chat template; template errors (e.g. roles that must alternate) become 400."""
    try:
        return engine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as error:
        raise APIError.invalid(f"could not apply the chat template: {error}", param="messages") from error


@dataclass
class ChoiceAccumulator:
    """Everything generated so far for one choice."""

    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None

    def add(self, output: RequestOutput) -> None:
        """Fold one engine output in."""
        self.text_parts.append(output.text_delta)
        if output.logprobs_delta:
            self.logprobs.extend(output.logprobs_delta)
        self.completion_tokens = output.completion_tokens
        if output.finished:
            self.finish_reason = output.finish_reason

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(self.text_parts)


def completion_tokens_total(accumulators: dict[int, ChoiceAccumulator]) -> int:
    """Generated tokens over every choice."""
    return sum(acc.completion_tokens for acc in accumulators.values())
