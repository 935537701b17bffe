"""Output assembly: a sampled token becomes a `RequestOutput` (text delta, logprobs, stop strings, finish).

Runs on the engine thread. Each request has an incremental detokenizer; a stop string found in the text finishes
the sequence through the scheduler. Plain Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fitserve.server.engine.detokenizer import IncrementalDetokenizer
from fitserve.server.engine.scheduler import Sequence
from fitserve.server.engine.types import (
    EngineError,
    FinishReason,
    RequestOutput,
    SampledToken,
    TokenLogprob,
    TopLogprob,
)

FinishFn = Callable[[Sequence, FinishReason], None]


class OutputProcessor:
    """Turns each request's new tokens into output increments; one detokenizer per request in flight."""

    def __init__(self, tokenizer: Any, finish: FinishFn) -> None:
        self._tokenizer = tokenizer
        self._finish = finish  # the scheduler's `finish`: a stop string ends the sequence there
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def start(self, seq: Sequence) -> None:
        """Begin tracking an admitted request."""
        self._detokenizers[seq.request_id] = IncrementalDetokenizer(self._tokenizer, seq.params.stop)

    def drop(self, request_id: str) -> None:
        """Forget a request that left the engine."""
        self._detokenizers.pop(request_id, None)

    def emit(self, seq: Sequence, token: int, sampled: SampledToken) -> RequestOutput:
        """The output increment for `token`, just appended to `seq` (finishing it on a stop string)."""
        detokenizer = self._detokenizers[seq.request_id]
        text = ""
        if seq.finish_reason is not FinishReason.STOP:  # EOS / stop token ids never show up as text
            delta = detokenizer.add(token)
            text = delta.text
            if delta.stopped:
                if seq.is_finished:  # the same token also hit max_tokens: the stop string wins, as in OpenAI
                    seq.finish_reason = FinishReason.STOP
                else:
                    self._finish(seq, FinishReason.STOP)
        if seq.is_finished:
            text += detokenizer.flush()
        logprobs = (self._token_logprob(sampled),) if seq.params.logprobs is not None else None
        return RequestOutput(
            request_id=seq.request_id,
            text_delta=text,
            token_ids_delta=(token,),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            logprobs_delta=logprobs,
        )

    def final(self, seq: Sequence) -> RequestOutput:
        """The closing increment of a sequence that finished without a new token (abort, error, shutdown)."""
        detokenizer = self._detokenizers.get(seq.request_id)
        text = ""
        if detokenizer is not None and seq.finish_reason is not FinishReason.ABORT:
            text = detokenizer.flush()
        return RequestOutput(
            seq.request_id,
            text,
            (),
            True,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            () if seq.params.logprobs is not None else None,
        )

    def failure(self, seq: Sequence, error: EngineError) -> RequestOutput | EngineError:
        """Before any output the error itself goes to the client; after, the stream ends with its final output
        (finish_reason ERROR or whatever ended it)."""
        return error if seq.num_output_tokens == 0 else self.final(seq)

    def _token_logprob(self, sampled: SampledToken) -> TokenLogprob:
        decode = self._tokenizer.decode
        top = tuple(TopLogprob(i, decode([i]), lp) for i, lp in sampled.top)
        return TokenLogprob(sampled.token_id, decode([sampled.token_id]), sampled.logprob or 0.0, top)
