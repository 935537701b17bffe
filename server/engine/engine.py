"""The continuous-batching engine: a step loop in its own thread behind the async `EngineClient` interface.

The loop runs `scheduler.schedule()` -> `runner.run(batch)` -> `scheduler.postprocess(...)` for as long as there
is work, so forward passes never block the asyncio event loop. Requests enter through a locked inbox; outputs go
back to each request's `asyncio.Queue` with one `loop.call_soon_threadsafe` per step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Any

from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.detokenizer import IncrementalDetokenizer
from fitserve.server.engine.runner import ModelRunner, is_oom
from fitserve.server.engine.sampling import SampledToken
from fitserve.server.engine.scheduler import ScheduledBatch, Scheduler, Sequence
from fitserve.server.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineSnapshot,
    EngineUnavailableError,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    RequestStats,
    SamplingParams,
    StatsSink,
    StepStats,
    TokenLogprob,
    TopLogprob,
)

logger = logging.getLogger(__name__)

_STATUS = {
    FinishReason.STOP: "ok",
    FinishReason.LENGTH: "length",
    FinishReason.ERROR: "error",
    FinishReason.ABORT: "aborted",
}

_Delivery = tuple[asyncio.Queue, "RequestOutput | BaseException"]


@dataclass
class _Request:
    """Engine-side bookkeeping of one request."""

    seq: Sequence
    queue: asyncio.Queue
    detokenizer: IncrementalDetokenizer


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
        self.stats_sink = stats_sink
        self.scheduler = Scheduler(config, eos_token_ids(model, tokenizer))
        self.runner = ModelRunner(model, config)
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[Sequence] = []
        self._aborts: list[str] = []
        self._requests: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._shutdown = False
        self._dead: BaseException | None = None
        self._snapshot = self._build_snapshot()

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
        return self._accepting and self._dead is None and self._thread is not None and self._thread.is_alive()

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the step loop thread (idempotent)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_loop, name="fitserve-engine", daemon=True)
        self._accepting = True
        self._thread.start()

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop admitting, let pending requests finish for up to `timeout_s`, abort the rest, join the thread."""
        self._accepting = False
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        while self._requests and self._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._shutdown = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, max(1.0, deadline - time.monotonic() + 5.0))
        if self._thread.is_alive():
            logger.warning("engine thread did not stop in time (a step is still running)")

    async def check_health(self) -> None:
        """Raise `EngineUnavailableError` if the loop died (or was never started)."""
        if self._dead is not None:
            raise EngineUnavailableError(f"The engine loop died: {self._dead!r}")
        if self._thread is None or not self._thread.is_alive():
            raise EngineUnavailableError("The engine loop is not running.")

    def snapshot(self) -> EngineSnapshot:
        """Gauges as of the last step; never blocks on the loop."""
        return self._snapshot

    # ---- EngineClient: requests ----------------------------------------------------------------------------------

    async def generate(
        self, prompt_token_ids: SequenceT[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs; aborts the request if the consumer stops early."""
        arrival = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue()
        try:
            seq = self._submit(list(prompt_token_ids), params, request_id, queue, arrival)
        except EngineError as exc:
            if not isinstance(exc, EngineUnavailableError):
                self._record_request(
                    RequestStats("rejected", len(prompt_token_ids), 0, None, None, time.monotonic() - arrival)
                )
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._request_abort(seq.request_id)

    def _submit(
        self, prompt: list[int], params: SamplingParams, request_id: str, queue: asyncio.Queue, arrival: float
    ) -> Sequence:
        if not self.is_ready:
            raise EngineUnavailableError("The engine is not accepting requests (starting, stopping or dead).")
        self.scheduler.check_fits(len(prompt), params.max_tokens)
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise InvalidRequestError(f"Prompt token ids must be in [0, {self._vocab_size}).")
        seq = Sequence(request_id, prompt, len(prompt), params, arrival)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        with self._lock:
            if request_id in self._requests:
                raise InvalidRequestError(f"Request id {request_id!r} is already in flight.")
            self._requests[request_id] = _Request(seq, queue, detok)
            self._inbox.append(seq)
        self._wake.set()
        return seq

    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown ids are ignored. Its KV is freed before the next step."""
        self._request_abort(request_id)

    def _request_abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._requests:
                self._aborts.append(request_id)
        self._wake.set()

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

    # ---- the loop (engine thread) ------------------------------------------------------------------------------------

    def _run_loop(self) -> None:
        self.runner.configure_threads()
        try:
            while True:
                deliveries = self._drain_inbox()
                if self._shutdown:
                    deliveries += self._abort_all()
                    self._deliver(deliveries)
                    break
                if not self.scheduler.has_work:
                    self._deliver(deliveries)
                    self._refresh_snapshot()
                    self._wake.wait(self.config.idle_wait_s)
                    self._wake.clear()
                    continue
                deliveries += self._step()
                self._deliver(deliveries)
        except BaseException as exc:
            logger.exception("engine loop died")
            self._dead = exc
            self._accepting = False
            self._deliver(self._fail_all(EngineUnavailableError(f"The engine loop died: {exc!r}")))
        finally:
            self._refresh_snapshot()

    def _drain_inbox(self) -> list[_Delivery]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        deliveries: list[_Delivery] = []
        for seq in inbox:
            try:
                self.scheduler.add(seq)
            except EngineError as exc:
                req = self._pop_request(seq.request_id)
                self._record_request(RequestStats("rejected", seq.num_prompt_tokens, 0, None, None, None))
                if req is not None:
                    deliveries.append((req.queue, exc))
        for request_id in aborts:
            seq = self.scheduler.abort(request_id)
            if seq is not None:
                deliveries.append(self._final_output(seq, ""))
        if inbox or aborts:
            self._refresh_snapshot()
        return deliveries

    def _step(self) -> list[_Delivery]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            self._wake.wait(self.config.idle_wait_s)
            self._wake.clear()
            return []
        if batch.step == self.config.crash_inject_step:
            raise RuntimeError(f"injected engine crash at step {batch.step} (EngineConfig.crash_inject_step)")
        t0 = time.perf_counter()
        try:
            sampled = self.runner.run(batch)
        except Exception as exc:  # noqa: BLE001 - every step failure is attributed and reported, never raised
            if is_oom(exc):
                return self._handle_oom(batch, exc)
            return self._handle_step_error(batch, exc)
        by_seq = {c.seq: s for c, s in zip((c for c in batch.chunks if c.sample), sampled, strict=False)}
        produced = self.scheduler.postprocess(batch, [s.token_id for s in sampled])
        deliveries = [self._emit(seq, token, by_seq[seq]) for seq, token in produced]
        self._record_step(
            StepStats(len(batch.chunks), batch.num_prefill_tokens, len(batch.decodes), time.perf_counter() - t0)
        )
        self._refresh_snapshot()
        return deliveries

    def _emit(self, seq: Sequence, token: int, sampled: SampledToken) -> _Delivery:
        req = self._requests[seq.request_id]
        stopped_by_token = seq.finish_reason is FinishReason.STOP
        text = ""
        if not stopped_by_token:  # EOS / stop token ids never show up as text
            delta = req.detokenizer.add(token)
            text = delta.text
            if delta.stopped:
                if seq.is_finished:  # the same token also hit max_tokens: the stop string wins, as in OpenAI
                    seq.finish_reason = FinishReason.STOP
                else:
                    self.scheduler.finish(seq, FinishReason.STOP)
        if seq.is_finished:
            text += req.detokenizer.flush()
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs = (self._token_logprob(sampled),)
        out = RequestOutput(
            request_id=seq.request_id,
            text_delta=text,
            token_ids_delta=(token,),
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            logprobs_delta=logprobs,
        )
        if seq.is_finished:
            self._finish_request(seq)
        return (req.queue, out)

    def _token_logprob(self, sampled: SampledToken) -> TokenLogprob:
        decode = self.tokenizer.decode
        top = tuple(TopLogprob(i, decode([i]), lp) for i, lp in sampled.top)
        return TokenLogprob(sampled.token_id, decode([sampled.token_id]), sampled.logprob or 0.0, top)

    def _handle_oom(self, batch: ScheduledBatch, exc: BaseException) -> list[_Delivery]:
        failed = self.scheduler.handle_oom(batch)
        logger.warning(
            "out of memory at step %d (%s): batch cap lowered to %d, %d request(s) failed",
            batch.step,
            exc,
            self.scheduler.effective_batch_cap,
            len(failed),
        )
        error = EngineOverloadedError("Out of memory while running this request; retry later.")
        deliveries = [self._fail(seq, error) for seq in failed]
        self._refresh_snapshot()
        return deliveries

    def _handle_step_error(self, batch: ScheduledBatch, exc: BaseException) -> list[_Delivery]:
        """A step failed for a reason other than memory: fail its sequences, keep serving the others."""
        logger.error("engine step %d failed; failing its %d request(s)", batch.step, len(batch.chunks), exc_info=exc)
        error = EngineError(f"Internal engine error: {exc!r}")
        deliveries = []
        for chunk in batch.chunks:
            seq = chunk.seq
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ERROR)
                deliveries.append(self._fail(seq, error))
        self._refresh_snapshot()
        return deliveries

    # ---- endings ---------------------------------------------------------------------------------------------------

    def _final_output(self, seq: Sequence, text: str) -> _Delivery:
        req = self._requests.get(seq.request_id)
        if req is not None:
            text += req.detokenizer.flush() if seq.finish_reason is not FinishReason.ABORT else ""
        out = RequestOutput(
            seq.request_id,
            text,
            (),
            True,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            () if seq.params.logprobs is not None else None,
        )
        self._finish_request(seq)
        queue = req.queue if req is not None else asyncio.Queue()
        return (queue, out)

    def _fail(self, seq: Sequence, error: EngineError) -> _Delivery:
        """Before any output the error is raised to the client; after, the stream ends with finish_reason ERROR."""
        if seq.num_output_tokens == 0:
            req = self._requests.get(seq.request_id)
            self._finish_request(seq)
            return ((req.queue if req else asyncio.Queue()), error)
        return self._final_output(seq, "")

    def _abort_all(self) -> list[_Delivery]:
        deliveries = []
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            self.scheduler.finish(seq, FinishReason.ABORT)
            deliveries.append(self._final_output(seq, ""))
        return deliveries

    def _fail_all(self, error: EngineError) -> list[_Delivery]:
        deliveries = []
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for seq in (*self.scheduler.running, *self.scheduler.waiting, *inbox):
            if not seq.is_finished:
                seq.finish_reason = FinishReason.ERROR
            if seq.request_id in self._requests:
                deliveries.append(self._fail(seq, error))
        return deliveries

    def _finish_request(self, seq: Sequence) -> None:
        if self._pop_request(seq.request_id) is None:
            return
        arrival = seq.arrival_s
        self._record_request(
            RequestStats(
                status=_STATUS.get(seq.finish_reason or FinishReason.ERROR, "error"),
                prompt_tokens=seq.num_prompt_tokens,
                generation_tokens=seq.num_output_tokens,
                queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - arrival,
                ttft_s=None if seq.first_token_s is None else seq.first_token_s - arrival,
                e2e_s=(seq.finished_s or time.monotonic()) - arrival,
                inter_token_latencies_s=tuple(seq.inter_token_latencies_s),
            )
        )

    def _pop_request(self, request_id: str) -> _Request | None:
        with self._lock:
            return self._requests.pop(request_id, None)

    # ---- outputs, stats, gauges -------------------------------------------------------------------------------------

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        if deliveries and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the event loop closed under us (process shutdown)
                logger.debug("event loop closed; %d outputs dropped", len(deliveries))

    def _record_step(self, stats: StepStats) -> None:
        if self.stats_sink is not None:
            try:
                self.stats_sink.record_step(stats)
            except Exception:
                logger.exception("stats sink failed on record_step")

    def _record_request(self, stats: RequestStats) -> None:
        if self.stats_sink is not None:
            try:
                self.stats_sink.record_request(stats)
            except Exception:
                logger.exception("stats sink failed on record_request")

    def _build_snapshot(self) -> EngineSnapshot:
        s = self.scheduler
        return EngineSnapshot(
            running=len(s.running),
            waiting=len(s.waiting) + len(self._inbox),
            kv_capacity_tokens=s.capacity_tokens,
            kv_used_tokens=s.kv_used_tokens,
            kv_reserved_tokens=s.kv_reserved_tokens,
            max_batch_size=s.effective_batch_cap,
            oom_events_total=s.oom_events_total,
            preemptions_total=s.preemptions_total,
            prefix_cache_queries_total=s.allocator.query_tokens_total,
            prefix_cache_hits_total=s.allocator.hit_tokens_total,
        )

    def _refresh_snapshot(self) -> None:
        self._snapshot = self._build_snapshot()


def _put_all(deliveries: list[_Delivery]) -> None:
    for queue, item in deliveries:
        queue.put_nowait(item)
