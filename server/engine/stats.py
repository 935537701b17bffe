"""Stats emission: the engine's `StepStats` / `RequestStats` to the sink, and the `EngineSnapshot` gauges.

Runs on the engine thread; a failing sink is logged and never breaks the loop. Plain Python, no torch.
"""

from __future__ import annotations

import logging
import time

from fitserve.server.engine.scheduler import ScheduledBatch, Scheduler, Sequence
from fitserve.server.engine.types import EngineSnapshot, RequestStats, RequestStatus, StatsSink, StepStats

logger = logging.getLogger(__name__)


class StatsReporter:
    """Builds stats from the scheduler's sequences and steps, and hands them to the `StatsSink`."""

    def __init__(self, sink: StatsSink | None) -> None:
        self._sink = sink

    def record_step(self, batch: ScheduledBatch, duration_s: float) -> None:
        """One completed engine step."""
        self._emit(StepStats(len(batch.chunks), batch.num_prefill_tokens, len(batch.decodes), duration_s))

    def record_finished(self, seq: Sequence) -> None:
        """A request that leaves the engine (finished, aborted or failed)."""
        arrival = seq.arrival_s
        self._emit(
            RequestStats(
                status=RequestStatus.of(seq.finish_reason),
                prompt_tokens=seq.num_prompt_tokens,
                generation_tokens=seq.num_output_tokens,
                queue_s=None if seq.first_scheduled_s is None else seq.first_scheduled_s - arrival,
                ttft_s=None if seq.first_token_s is None else seq.first_token_s - arrival,
                e2e_s=(seq.finished_s or time.monotonic()) - arrival,
                inter_token_latencies_s=tuple(seq.inter_token_latencies_s),
            )
        )

    def record_rejected(self, prompt_tokens: int, e2e_s: float | None = None) -> None:
        """A request refused at admission."""
        self._emit(RequestStats(RequestStatus.REJECTED, prompt_tokens, 0, None, None, e2e_s))

    def _emit(self, stats: StepStats | RequestStats) -> None:
        if self._sink is None:
            return
        try:
            if isinstance(stats, StepStats):
                self._sink.record_step(stats)
            else:
                self._sink.record_request(stats)
        except Exception:
            logger.exception("stats sink failed on %s", type(stats).__name__)


def build_snapshot(scheduler: Scheduler, submitted: int) -> EngineSnapshot:
    """The engine's gauges now; `submitted` counts requests not yet taken from the inbox (they wait too)."""
    cap = scheduler.current_max_batch_size
    return EngineSnapshot(
        running=len(scheduler.running),
        waiting=len(scheduler.waiting) + submitted,
        kv_capacity_tokens=scheduler.capacity_tokens,
        kv_used_tokens=scheduler.kv_used_tokens,
        kv_reserved_tokens=scheduler.kv_reserved_tokens,
        current_max_batch_size=cap if cap is not None else scheduler.allocator.num_blocks,
        oom_events_total=scheduler.oom_events_total,
        preemptions_total=scheduler.preemptions_total,
        prefix_cache_queries_total=scheduler.allocator.query_tokens_total,
        prefix_cache_hits_total=scheduler.allocator.hit_tokens_total,
    )
