"""`FakeEngine`: an `EngineClient` with a byte-level tokenizer and scripted word-by-word replies.

It behaves like the real engine at the seam the HTTP layer sees: admission errors are raised before the
first output, outputs are cumulative in `completion_tokens`, the last one carries `finished=True`, stop
strings and max_tokens end the sequence, and a consumer that stops iterating aborts the request. Knobs make
it refuse work (queue full, too long, unavailable), fail mid-stream, or go slowly so disconnects can be tested.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from fitserve.server.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    PromptTooLongError,
    QueueFullError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

VOCABULARY = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")
GREEDY_REPLY = ("Paris", "is", "the", "capital", "of", "France", "and", "a", "lovely", "city")


@dataclass(frozen=True)
class SubmittedRequest:
    """What the fake received for one engine request."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


class FakeEngine:
    """A scripted engine for route tests; every public knob may be changed between requests."""

    def __init__(
        self,
        model_name: str = "fake-model",
        max_model_len: int = 256,
        reply_words: int = 6,
        token_delay_s: float = 0.0,
        max_running: int | None = None,
    ) -> None:
        self._model_name = model_name
        self._max_model_len = max_model_len
        self.vocab_size = 256
        self.reply_words = reply_words
        self.token_delay_s = token_delay_s
        self.max_running = max_running  # None: unlimited; else QueueFullError beyond it
        self.ready = True
        self.dead = False
        self.admission_error: EngineError | None = None
        self.fail_after_tokens: int | None = None  # raise EngineOverloadedError after this many tokens
        self.submitted: list[SubmittedRequest] = []
        self.running: set[str] = set()
        self.finished: set[str] = set()
        self.aborted: list[str] = []

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self._model_name

    @property
    def max_model_len(self) -> int:
        """Context length in (byte) tokens."""
        return self._max_model_len

    @property
    def is_ready(self) -> bool:
        """Set `ready` to False to simulate loading."""
        return self.ready

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Admit (or refuse) the request, then stream one word per token."""
        self._admit(prompt_token_ids, params, request_id)
        self.running.add(request_id)
        async for output in self._admitted(prompt_token_ids, params, request_id):
            yield output

    async def generate_group(self, requests: Sequence[GenerationRequest]) -> list[AsyncIterator[RequestOutput]]:
        """Admit every request or none (the running cap counts the whole group), then one stream each."""
        if self.max_running is not None and len(self.running) + len(requests) > self.max_running:
            raise QueueFullError(max_waiting=self.max_running, retry_after_s=2, requested=len(requests))
        for request in requests:
            self._admit(request.prompt_token_ids, request.params, request.request_id)
        self.running.update(request.request_id for request in requests)
        return [self._admitted(r.prompt_token_ids, r.params, r.request_id) for r in requests]

    async def _admitted(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self._run(prompt_token_ids, params, request_id):
                yield output
        finally:
            self.running.discard(request_id)
            if request_id not in self.finished:
                self.aborted.append(request_id)

    def _admit(self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str) -> None:
        if self.dead:
            raise EngineUnavailableError("the engine loop is dead")
        if self.admission_error is not None:
            raise self.admission_error
        needed = len(prompt_token_ids) + params.max_tokens
        if needed > self._max_model_len:
            raise PromptTooLongError(len(prompt_token_ids), params.max_tokens, self._max_model_len, "model's context")
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise QueueFullError(max_waiting=self.max_running, retry_after_s=2)
        self.submitted.append(SubmittedRequest(request_id, tuple(prompt_token_ids), params))

    async def _run(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        words = self._script(params)
        text = ""
        for count, word in enumerate(words, start=1):
            await asyncio.sleep(self.token_delay_s)
            if self.fail_after_tokens is not None and count > self.fail_after_tokens:
                raise EngineOverloadedError("out of memory while decoding")
            piece = word if count == 1 else " " + word
            new_text = text + piece
            stop_at = _first_stop(new_text, params.stop)
            reason: FinishReason | None = None
            if stop_at is not None:
                piece, reason = new_text[:stop_at][len(text) :], FinishReason.STOP
            elif count == params.max_tokens:
                reason = FinishReason.LENGTH
            elif count == len(words):
                reason = FinishReason.STOP
            text += piece
            if reason is not None:
                self.finished.add(request_id)
            yield RequestOutput(
                request_id=request_id,
                text_delta=piece,
                token_ids_delta=(count,),
                finished=reason is not None,
                finish_reason=reason,
                prompt_tokens=len(prompt_token_ids),
                completion_tokens=count,
                logprobs_delta=_logprobs(piece, count, params.logprobs),
            )
            if reason is not None:
                return

    def _script(self, params: SamplingParams) -> list[str]:
        if params.is_greedy:
            return list(GREEDY_REPLY[: self.reply_words])
        rng = random.Random(params.seed)
        return [rng.choice(VOCABULARY) for _ in range(self.reply_words)]

    async def abort(self, request_id: str) -> None:
        """Record the abort (the generator's own cleanup records it too)."""
        if request_id in self.running and request_id not in self.aborted:
            self.aborted.append(request_id)

    async def check_health(self) -> None:
        """Set `dead` to simulate a crashed engine loop."""
        if self.dead:
            raise EngineUnavailableError("the engine loop is dead")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """UTF-8 bytes; `add_special_tokens` prepends byte 1 as a BOS stand-in."""
        ids = list(text.encode("utf-8"))
        return [1, *ids] if add_special_tokens else ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Bytes back to text (the BOS stand-in included)."""
        return bytes(token_ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """A minimal template: `<role>content\\n` per message, then `<assistant>`."""
        if any(message["role"] not in ("system", "user", "assistant") for message in messages):
            raise ValueError("unsupported role in template")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.tokenize(text, add_special_tokens=False)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def _logprobs(piece: str, token_id: int, top_k: int | None) -> tuple[TokenLogprob, ...] | None:
    if top_k is None:
        return None
    top = tuple(TopLogprob(token_id=token_id + i, token=f"alt{i}", logprob=-1.0 - i) for i in range(top_k))
    return (TokenLogprob(token_id=token_id, token=piece, logprob=-0.25, top=top),)
