"""`Engine`: the continuous-batching engine behind the async `EngineClient` interface (the facade).

It wires the parts, one job per module: the client bridge (`bridge.py`: inbox, output queues, delivery to the
event loop), the core loop on its own thread (`core.py`: schedule -> run -> postprocess, failure handling), output
assembly (`output.py`: detokenising, logprobs, stop strings) and stats (`stats.py`). Forward passes never block
the asyncio event loop. This class validates requests, submits them, and owns the lifecycle of the loop thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as SequenceT
from typing import Any

from fitserve.server.engine.bridge import RequestBridge
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.core import EngineCore
from fitserve.server.engine.output import OutputProcessor
from fitserve.server.engine.runner import ModelRunner
from fitserve.server.engine.scheduler import Scheduler, Sequence
from fitserve.server.engine.stats import StatsReporter
from fitserve.server.engine.types import (
    EngineError,
    EngineSnapshot,
    EngineUnavailableError,
    GenerationRequest,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
    StatsSink,
)

logger = logging.getLogger(__name__)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the model's generation config and the tokenizer."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, Iterable):
            ids.update(int(i) for i in source)
    return ids


class Engine:
    """Continuous-batching engine over a transformers CausalLM; implements `EngineClient`."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, stats_sink: StatsSink | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(config, eos_token_ids(model, tokenizer))
        self.runner = ModelRunner(model, config)
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._bridge = RequestBridge()
        self._stats = StatsReporter(stats_sink)
        self._core = EngineCore(
            self.scheduler,
            self.runner,
            OutputProcessor(tokenizer, self.scheduler.finish),
            self._stats,
            self._bridge,
            config.idle_wait_s,
            config.crash_inject_step,
        )
        self._thread: threading.Thread | None = None
        self._accepting = False

    # ---- EngineClient: properties --------------------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The served model name."""
        return self.config.served_model_name

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion accepted, in tokens."""
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding table; token ids must be below this."""
        return self._vocab_size

    @property
    def is_ready(self) -> bool:
        """True while the loop thread runs and new requests are accepted."""
        return self._accepting and self._core.dead is None and self._thread is not None and self._thread.is_alive()

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the step loop thread (idempotent)."""
        if self._thread is not None:
            return
        self._bridge.bind(asyncio.get_running_loop())
        self._thread = threading.Thread(
            target=self._core.run_loop, args=(self._stop_accepting,), name="fitserve-engine", daemon=True
        )
        self._accepting = True
        self._thread.start()

    def _stop_accepting(self) -> None:
        self._accepting = False

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let pending requests finish for up to `timeout_s`, abort the rest, join the thread."""
        self._accepting = False
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._bridge.has_requests and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._core.shutdown = True
        self._bridge.wake()
        await asyncio.to_thread(self._thread.join, max(1.0, deadline - time.monotonic() + 5.0))
        if self._thread.is_alive():
            logger.warning("engine thread did not stop in time (a step is still running)")

    async def check_health(self) -> None:
        """Raise `EngineUnavailableError` if the loop died (or was never started)."""
        if self._core.dead is not None:
            raise EngineUnavailableError("The engine loop died.")
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailableError("The engine loop is not running.")

    def snapshot(self) -> EngineSnapshot:
        """Gauges as of the last step; never blocks on the loop."""
        return self._core.snapshot

    # ---- EngineClient: requests ----------------------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: SequenceT[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs; aborts the request if the consumer stops early."""
        (stream,) = await self.generate_group([GenerationRequest(prompt_token_ids, params, request_id)])
        async for output in stream:
            yield output

    async def generate_group(self, requests: SequenceT[GenerationRequest]) -> list[AsyncIterator[RequestOutput]]:
        """Admit the requests as one unit (all or none, decided by the engine thread), then one stream each."""
        arrival = time.monotonic()
        try:
            seqs = [self._sequence(request, arrival) for request in requests]
            group = self._bridge.submit(seqs)
        except EngineError as exc:
            if not isinstance(exc, EngineUnavailableError):
                for request in requests:
                    self._stats.record_rejected(len(request.prompt_token_ids), time.monotonic() - arrival)
            raise
        try:
            await group.admitted
        except asyncio.CancelledError:  # the client left while waiting: whatever was admitted is aborted
            for seq in seqs:
                self._bridge.request_abort(seq.request_id)
            raise
        return [self._bridge.stream(seq.request_id, queue) for seq, queue in zip(seqs, group.queues, strict=True)]

    def _sequence(self, request: GenerationRequest, arrival: float) -> Sequence:
        """Validate one request and make its sequence."""
        if not self.is_ready:
            raise EngineUnavailableError("The engine is not accepting requests (starting, stopping or dead).")
        prompt, params = list(request.prompt_token_ids), request.params
        self.scheduler.check_fits(len(prompt), params.max_tokens)
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise InvalidRequestError(f"Prompt token ids must be in [0, {self._vocab_size}).", param="prompt")
        if any(not 0 <= token < self._vocab_size for token, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {self._vocab_size}).", param="logit_bias")
        return Sequence(request.request_id, prompt, len(prompt), params, arrival)

    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown ids are ignored. Its KV is freed before the next step."""
        self._bridge.request_abort(request_id)

    # ---- EngineClient: tokenizer -----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to token ids."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def detokenize(self, token_ids: SequenceT[int]) -> str:
        """Token ids to text (special tokens kept)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: SequenceT[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Messages to prompt token ids through the model's chat template."""
        encoded = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
