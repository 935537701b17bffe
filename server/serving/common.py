"""Helpers shared by the serving classes: model check, prompt validation, per-choice accumulation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from jinja2 import TemplateError

from fitserve.server.engine.types import (
    EngineClient,
    EngineError,
    EngineUnavailableError,
    FinishReason,
    RequestOutput,
    TokenLogprob,
)
from fitserve.server.protocol.common import SamplingRequest
from fitserve.server.protocol.errors import APIError, http_mapping_for
from fitserve.server.request_id import current_request_id
from fitserve.server.serving.cpu_pool import CPUWorkPool

logger = logging.getLogger(__name__)


def engine_error_to_api(error: EngineError, prompt_param: str | None = None) -> APIError:
    """The client's view of an engine error: a dead or stopped engine says so without its internals.

    The engine's own message for an unavailable loop may carry the exception that killed it; that goes to the
    log with the request id, and the client gets a stable message plus the id.
    """
    if isinstance(error, EngineUnavailableError):
        logger.warning("request %s: engine unavailable: %s", current_request_id(), error)
        return APIError(503, "The engine is not available; retry later.", code=http_mapping_for(error).code)
    return APIError.from_engine(error, prompt_param=prompt_param)


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


class GenerationServing:
    """What the serving class of every generation endpoint holds, and the checks it runs before any work."""

    def __init__(self, engine: EngineClient, pool: CPUWorkPool, max_choices_per_request: int) -> None:
        self._engine = engine
        self._pool = pool  # tokenising and templating run here, off the event loop
        self._max_choices = max_choices_per_request

    def check_request(self, request: SamplingRequest, num_prompts: int) -> None:
        """404 for another model, 400 for too many choices (prompts x n) or an out-of-vocabulary logit bias."""
        check_model(self._engine, request.model)
        check_choices(num_prompts, request.n, self._max_choices)
        check_logit_bias(self._engine, request)


def tokenize_text(engine: EngineClient, text: str, add_special_tokens: bool = True) -> list[int]:
    """Tokenize with the engine's tokenizer (blocking: run it in the CPU pool); failures are a 400."""
    try:
        return engine.tokenize(text, add_special_tokens=add_special_tokens)
    except Exception as error:
        raise _input_error("could not tokenize the input", "prompt", error) from error


def render_chat(engine: EngineClient, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Apply the chat template (blocking: run it in the CPU pool); template errors become 400.

    A template's own `raise_exception` message (e.g. roles that must alternate) is meant for the user and is
    passed on; any other failure gets a stable message and the detail goes to the log.
    """
    try:
        return engine.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as error:
        raise APIError.invalid(f"could not apply the chat template: {error}", param="messages") from error
    except Exception as error:
        raise _input_error("could not apply the chat template", "messages", error) from error


def detokenize_ids(engine: EngineClient, token_ids: Sequence[int], param: str) -> str:
    """Token ids to text (blocking: run it in the CPU pool); failures are a 400."""
    try:
        return engine.detokenize(token_ids)
    except Exception as error:
        raise _input_error("could not detokenize the token ids", param, error) from error


def _input_error(message: str, param: str, error: Exception) -> APIError:
    """A 400 with a stable message; the exception goes to the log under the request id."""
    logger.info("request %s: %s (param %s): %r", current_request_id(), message, param, error)
    return APIError.invalid(f"{message}.", param=param)


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
