"""The engine core: the step loop on the engine thread (`schedule()` -> `runner.run()` -> `postprocess()`).

It takes submitted groups and aborts from the bridge, runs steps while there is work, and turns every outcome into
deliveries for the bridge. Failures are attributed as narrowly as possible:

* a row whose sampling fails (non-finite logits, or sampling raised for it alone) fails only its sequence;
* a failure while assembling one sequence's output (detokenising, stop strings) fails only that sequence;
* an out-of-memory step lowers the batch cap and re-queues the batch (`Scheduler.handle_oom`);
* any other step failure cannot be attributed, so each of the step's sequences is run again alone, once; those
  that fail alone too are failed, the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fitserve.quant.heap import trim_free_heap
from fitserve.server.engine.bridge import Delivery, RequestBridge
from fitserve.server.engine.output import OutputProcessor
from fitserve.server.engine.runner import ModelRunner, is_oom
from fitserve.server.engine.scheduler import ScheduledBatch, ScheduledChunk, Scheduler, Sequence
from fitserve.server.engine.stats import StatsReporter, build_snapshot
from fitserve.server.engine.types import (
    EngineError,
    EngineOverloadedError,
    EngineSnapshot,
    EngineUnavailableError,
    FinishReason,
    RequestFailedError,
    SampledToken,
    SampleFailure,
    SampleResult,
)

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler, runner, output processor and stats; `run_loop` is the engine thread's body."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        output: OutputProcessor,
        stats: StatsReporter,
        bridge: RequestBridge,
        idle_wait_s: float,
        crash_inject_step: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.output = output
        self.stats = stats
        self.bridge = bridge
        self.idle_wait_s = idle_wait_s
        self.crash_inject_step = crash_inject_step  # fault injection (tests): the step at which the loop dies
        self.shutdown = False  # set from the event loop; the loop aborts what is left and exits
        self.dead: BaseException | None = None
        self.snapshot: EngineSnapshot = build_snapshot(scheduler, 0)
        self._worked_since_trim = False  # a step ran since the heap was last trimmed

    def run_loop(self, on_death: Callable[[], None]) -> None:
        """Step until `shutdown`; if the loop itself dies, fail every request and call `on_death`."""
        self.runner.configure_threads()
        try:
            while True:
                deliveries = self._drain_inbox()
                if self.shutdown:
                    deliveries += self._abort_all()
                    self.bridge.deliver(deliveries)
                    break
                if not self.scheduler.has_work:
                    self.bridge.deliver(deliveries)
                    self._refresh_snapshot()
                    if self._worked_since_trim:  # idle after work: hand the burst's freed heap back to the OS
                        self._worked_since_trim = False
                        trim_free_heap()
                    self.bridge.wait(self.idle_wait_s)
                    continue
                self._worked_since_trim = True
                deliveries += self._step()
                self.bridge.deliver(deliveries)
        except BaseException as exc:
            logger.exception("engine loop died")
            self.dead = exc
            on_death()
            self.bridge.deliver(self._fail_all(EngineUnavailableError("The engine loop died.")))
        finally:
            self._refresh_snapshot()

    # ---- intake ----------------------------------------------------------------------------------------------

    def _drain_inbox(self) -> list[Delivery]:
        groups, aborts = self.bridge.drain()
        deliveries: list[Delivery] = []
        for group in groups:
            try:
                self.scheduler.add_group(group.seqs)
            except EngineError as exc:
                for seq in group.seqs:
                    self.bridge.pop(seq.request_id)
                    self.stats.record_rejected(seq.num_prompt_tokens)
                deliveries.append((group.admitted, exc))
                continue
            for seq in group.seqs:
                self.output.start(seq)
            deliveries.append((group.admitted, None))
        for request_id in aborts:
            aborted = self.scheduler.abort(request_id)
            if aborted is not None:
                deliveries.append(self._leave(aborted, self.output.final(aborted)))
        if groups or aborts:
            self._refresh_snapshot()
        return deliveries

    # ---- one step --------------------------------------------------------------------------------------------

    def _step(self) -> list[Delivery]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            self.bridge.wait(self.idle_wait_s)
            return []
        if batch.step == self.crash_inject_step:
            raise RuntimeError(f"injected engine crash at step {batch.step} (EngineConfig.crash_inject_step)")
        t0 = time.perf_counter()
        try:
            results = self.runner.run(batch)
        except Exception as exc:  # noqa: BLE001 - every step failure is attributed and reported, never raised
            if is_oom(exc):
                return self._handle_oom(batch, exc)
            return self._retry_alone(batch, exc)
        deliveries = self._postprocess(batch, results)
        self.stats.record_step(batch, time.perf_counter() - t0)
        self._refresh_snapshot()
        return deliveries

    def _postprocess(self, batch: ScheduledBatch, results: list[SampleResult]) -> list[Delivery]:
        """Fail the rows whose sampling failed, advance the batch, assemble each new token's output."""
        deliveries: list[Delivery] = []
        tokens: list[int] = []
        sampled: dict[Sequence, SampledToken] = {}
        for seq, result in zip((c.seq for c in batch.chunks if c.sample), results, strict=True):
            if isinstance(result, SampleFailure):
                deliveries += self._fail(seq, RequestFailedError(f"Sampling failed: {result.reason}."))
                tokens.append(0)  # a placeholder: postprocess skips the finished sequence's token
            else:
                sampled[seq] = result
                tokens.append(result.token_id)
        for seq, token in self.scheduler.postprocess(batch, tokens):
            try:
                output = self.output.emit(seq, token, sampled[seq])
            except Exception:
                logger.exception("assembling the output of request %s failed", seq.request_id)
                deliveries += self._fail(seq, RequestFailedError("Building this request's output failed."))
                continue
            deliveries.append(self._leave(seq, output) if seq.is_finished else self._send(seq, output))
        return deliveries

    def _handle_oom(self, batch: ScheduledBatch, exc: BaseException) -> list[Delivery]:
        failed = self.scheduler.handle_oom(batch)
        logger.warning(
            "out of memory at step %d (%s): max batch size lowered to %s, %d request(s) failed",
            batch.step,
            exc,
            self.scheduler.current_max_batch_size,
            len(failed),
        )
        error = EngineOverloadedError("Out of memory while running this request; retry later.")
        deliveries = [self._leave(seq, self.output.failure(seq, error)) for seq in failed]
        self._refresh_snapshot()
        return deliveries

    def _retry_alone(self, batch: ScheduledBatch, exc: BaseException) -> list[Delivery]:
        """A step failed for a reason other than memory: run each of its sequences alone once; fail those that
        fail alone too. (The failed step advanced nothing the scheduler relies on, so a rerun is a clean redo.)"""
        logger.error(
            "engine step %d failed; running its %d chunk(s) alone", batch.step, len(batch.chunks), exc_info=exc
        )
        deliveries: list[Delivery] = []
        for chunk in batch.chunks:
            if chunk.seq.is_finished:
                continue
            alone = _batch_of(batch, chunk)
            try:
                results = self.runner.run(alone)
            except Exception as solo_exc:
                if is_oom(solo_exc):
                    deliveries += self._handle_oom(alone, solo_exc)
                    continue
                logger.error("request %s failed alone at step %d", chunk.seq.request_id, batch.step, exc_info=solo_exc)
                deliveries += self._fail(
                    chunk.seq, RequestFailedError("Internal engine error while running this request.")
                )
                continue
            deliveries += self._postprocess(alone, results)
        self._refresh_snapshot()
        return deliveries

    # ---- endings ---------------------------------------------------------------------------------------------

    def _send(self, seq: Sequence, item: object) -> Delivery:
        """An output for a request that stays in flight."""
        return (self.bridge.output_queue(seq.request_id), item)

    def _leave(self, seq: Sequence, item: object) -> Delivery:
        """The last item of a request: it leaves the bridge and the output processor, and its stats are sent."""
        queue = self.bridge.pop(seq.request_id)
        self.output.drop(seq.request_id)
        if queue is not None:
            self.stats.record_finished(seq)
        return (queue, item)

    def _fail(self, seq: Sequence, error: EngineError) -> list[Delivery]:
        """Finish one sequence with ERROR and tell its client."""
        self.scheduler.finish(seq, FinishReason.ERROR)
        return [self._leave(seq, self.output.failure(seq, error))]

    def _abort_all(self) -> list[Delivery]:
        deliveries = []
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            self.scheduler.finish(seq, FinishReason.ABORT)
            deliveries.append(self._leave(seq, self.output.final(seq)))
        return deliveries

    def _fail_all(self, error: EngineError) -> list[Delivery]:
        groups, _ = self.bridge.drain()
        deliveries: list[Delivery] = [(group.admitted, error) for group in groups]
        for seq in (*self.scheduler.running, *self.scheduler.waiting, *(s for g in groups for s in g.seqs)):
            if not seq.is_finished:
                seq.finish_reason = FinishReason.ERROR
            deliveries.append(self._leave(seq, self.output.failure(seq, error)))
        return deliveries

    def _refresh_snapshot(self) -> None:
        self.snapshot = build_snapshot(self.scheduler, self.bridge.num_submitted)


def _batch_of(batch: ScheduledBatch, chunk: ScheduledChunk) -> ScheduledBatch:
    """A batch of the same step holding only `chunk`."""
    if chunk in batch.decodes:
        return ScheduledBatch(batch.step, (chunk,), ())
    return ScheduledBatch(batch.step, (), (chunk,))
