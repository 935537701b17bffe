"""Iteration-level scheduling and KV block accounting. Plain Python, no torch.

One engine step is `schedule()` -> runner -> `postprocess()`. The scheduler owns the waiting queue, the running
set and the KV block pool. Admission is by KV memory: a request reserves `prompt + max_tokens` tokens worth of
blocks when it is admitted, so a running sequence can never run out of cache and nothing is ever preempted for
room (only an OOM makes the scheduler evict sequences, which then recompute from their tokens).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Any

from fitserve.server.engine.block_pool import ROOT_KEY, BlockKey, BlockPool, PrefixHit
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.types import (
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """One request's tokens, KV blocks and timing. `token_ids` is prompt + generated tokens."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_s: float
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    oom_retries: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finished_s: float | None = None
    inter_token_latencies_s: list[float] = field(default_factory=list)
    sampling_state: Any = None  # owned by the runner (e.g. a torch.Generator); the scheduler never reads it
    slot_state: Any = None  # owned by the runner (cache slots of the block table); reset when blocks change
    prefix_blocks: int = 0  # leading blocks of the block table that are registered in the prefix cache
    prefix_key: BlockKey = ROOT_KEY  # the prefix-cache key of the last of those blocks

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def reserved_tokens(self) -> int:
        """KV tokens this sequence may ever need: prompt + max_tokens."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        """True once the sequence has left the scheduler."""
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` tokens of `seq` starting at position `start` to compute this step."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool  # True when the chunk ends at the sequence's last token, so a new token is sampled


@dataclass(frozen=True)
class ScheduledBatch:
    """What one step computes: decode chunks first, then prefill chunks, packed in this order."""

    step: int
    decodes: tuple[ScheduledChunk, ...]
    prefills: tuple[ScheduledChunk, ...]

    @property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        """All chunks in packing order."""
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to compute."""
        return not self.decodes and not self.prefills

    @property
    def num_prefill_tokens(self) -> int:
        """Prompt (or recompute) tokens in this step."""
        return sum(c.num_tokens for c in self.prefills)

    @property
    def num_sampled(self) -> int:
        """How many new tokens this step samples."""
        return sum(1 for c in self.chunks if c.sample)


class Scheduler:
    """Waiting queue + running set + KV block pool; decides what each step computes."""

    def __init__(
        self,
        config: EngineConfig,
        eos_token_ids: Iterable[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.block_size = config.block_size_tokens
        self.allocator = BlockPool(config.num_kv_blocks, self.block_size, enable_caching=config.enable_prefix_caching)
        self.capacity_tokens = self.allocator.num_blocks * self.block_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.current_max_batch_size: int | None = config.max_batch_size  # lowered after an OOM; None: no cap
        self.oom_events_total = 0
        self.preemptions_total = 0
        self._step = 0
        self._clean_steps = 0  # steps since the last OOM

    # ---- admission -------------------------------------------------------------------------------------------

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise `PromptTooLongError` if such a request could never be admitted."""
        if num_prompt_tokens <= 0:
            raise InvalidRequestError("The prompt is empty; at least one token is required.")
        if max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {max_tokens}.")
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise PromptTooLongError(num_prompt_tokens, max_tokens, self.config.max_model_len, "model's context length")
        if total > self.capacity_tokens:
            raise PromptTooLongError(num_prompt_tokens, max_tokens, self.capacity_tokens, "KV cache capacity")

    def add(self, seq: Sequence) -> None:
        """Take a new sequence, or raise `PromptTooLongError` / `QueueFullError` / `InvalidRequestError`.

        A sequence that can start now (nothing waits ahead of it, its KV reservation fits, the batch cap has room)
        is admitted at once and never counts against `max_waiting`; so `max_waiting=0` means "no queue": requests
        run or get 429. Otherwise it joins the waiting queue if that has room.
        """
        self.check_fits(seq.num_prompt_tokens, seq.params.max_tokens)
        if not self.waiting and (hit := self._admission(seq)) is not None:
            self._admit(seq, hit)
            return
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(self.config.max_waiting)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_group(self, seqs: SequenceT[Sequence]) -> None:
        """Take several sequences as one unit (the choices of one HTTP request): all of them, or none.

        Raises the first sequence's `check_fits` error, or `QueueFullError` when the ones that could not start
        now would not all fit the waiting queue; nothing is taken then. The count of those that start now is a
        lower bound (it ignores prefix-cache hits, which only ever need fewer fresh blocks), so the sequences
        added afterwards never meet a full queue.
        """
        for seq in seqs:
            self.check_fits(seq.num_prompt_tokens, seq.params.max_tokens)
        must_wait = len(seqs) - self._startable_now(seqs)
        if must_wait and len(self.waiting) + must_wait > self.config.max_waiting:
            raise QueueFullError(self.config.max_waiting, requested=len(seqs))
        for seq in seqs:
            self.add(seq)

    def _startable_now(self, seqs: SequenceT[Sequence]) -> int:
        """How many of `seqs`, taken in order, surely start at once: nothing waits, the batch cap and the KV
        reservations (counted without prefix hits) have room."""
        if self.waiting:
            return 0
        slots = len(seqs)
        if self.current_max_batch_size is not None:
            slots = max(0, self.current_max_batch_size - len(self.running))
        free_blocks = self.allocator.num_free
        started = 0
        for seq in seqs[:slots]:
            need = self._blocks_for(seq.reserved_tokens)
            if need > free_blocks:
                break
            free_blocks -= need
            started += 1
        return started

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _admission(self, seq: Sequence) -> PrefixHit | None:
        """The cached prefix the sequence would start from, or None while the batch cap or the KV reservation
        (less the blocks that prefix supplies) does not fit."""
        if self.current_max_batch_size is not None and len(self.running) >= self.current_max_batch_size:
            return None
        # at least the last known token is computed, so the step that admits it has logits to sample from
        hit = self.allocator.match(seq.token_ids, (len(seq.token_ids) - 1) // self.block_size)
        fits = self.allocator.can_allocate(hit, self._blocks_for(seq.reserved_tokens) - len(hit))
        return hit if fits else None

    def _admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Take the sequence's blocks (the cached prefix first) and start it after that prefix."""
        seq.block_table = self.allocator.allocate(hit, self._blocks_for(seq.reserved_tokens) - len(hit))
        seq.prefix_blocks, seq.prefix_key = len(hit), hit.last_key
        seq.num_computed_tokens = len(hit) * self.block_size
        self.allocator.record_lookup(len(seq.token_ids), seq.num_computed_tokens)
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_s is None:
            seq.first_scheduled_s = self.clock()
        self.running.append(seq)

    # ---- one step --------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work: every decoding sequence, then prefill chunks up to `max_prefill_tokens`."""
        self._step += 1
        budget = self.config.max_prefill_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        for seq in self.running:
            remaining = len(seq.token_ids) - seq.num_computed_tokens
            if remaining == 1 and seq.num_computed_tokens > 0:
                decodes.append(ScheduledChunk(seq, seq.num_computed_tokens, 1, True))
            elif self._fits_budget(remaining, budget):
                n = min(remaining, budget)
                budget -= n
                prefills.append(ScheduledChunk(seq, seq.num_computed_tokens, n, n == remaining))
        while self.waiting and (hit := self._admission(self.waiting[0])) is not None:
            seq = self.waiting[0]
            remaining = len(seq.token_ids) - len(hit) * self.block_size
            if not self._fits_budget(remaining, budget):
                break
            self.waiting.popleft()
            self._admit(seq, hit)
            n = min(remaining, budget)
            budget -= n
            prefills.append(ScheduledChunk(seq, seq.num_computed_tokens, n, n == remaining))
        return ScheduledBatch(self._step, tuple(decodes), tuple(prefills))

    def _fits_budget(self, remaining: int, budget: int) -> bool:
        """Whether to prefill (part of) a sequence with `remaining` uncomputed tokens in this step.

        A remainder that fits one step's budget is never split: it waits for a step with enough budget left,
        so short prompts are prefilled in one piece, exactly as a lone `model.generate` would. Only remainders
        larger than `max_prefill_tokens` are chunked.
        """
        if budget <= 0:
            return False
        return remaining <= budget or remaining > self.config.max_prefill_tokens

    def postprocess(self, batch: ScheduledBatch, sampled: SequenceT[int]) -> list[tuple[Sequence, int]]:
        """Advance the batch's sequences by the computed chunks and append the sampled tokens.

        `sampled` holds one token per chunk with `sample=True`, in packing order. Sequences that hit EOS, a stop
        token id, max_tokens or the context length are finished and their KV freed. Returns (sequence, new token)
        pairs, including for sequences that just finished.
        """
        now = self.clock()
        self._recover_cap()
        produced: list[tuple[Sequence, int]] = []
        it = iter(sampled)
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted while the step ran; skip its token if it had one
                if chunk.sample:
                    next(it)
                continue
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self._register_full_blocks(seq)
            if not chunk.sample:
                continue
            token = next(it)
            seq.token_ids.append(token)
            if seq.first_token_s is None:
                seq.first_token_s = now
            else:
                seq.inter_token_latencies_s.append(now - (seq.last_token_s or now))
            seq.last_token_s = now
            produced.append((seq, token))
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
        return produced

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed blocks to the prefix cache."""
        full = seq.num_computed_tokens // self.block_size
        if full > seq.prefix_blocks:
            seq.prefix_key = self.allocator.register(
                seq.block_table, seq.token_ids, seq.prefix_blocks, full, seq.prefix_key
            )
            seq.prefix_blocks = full

    def _recover_cap(self) -> None:
        """After `oom_recovery_steps` clean steps, double a cap an OOM lowered (up to the configured one)."""
        self._clean_steps += 1
        limit = self.config.max_batch_size
        recovery = self.config.oom_recovery_steps
        if recovery is None or self.current_max_batch_size == limit or self._clean_steps < recovery:
            return
        self._clean_steps = 0
        doubled = 2 * (self.current_max_batch_size or 1)
        if limit is not None:
            self.current_max_batch_size = min(doubled, limit)
        else:  # no configured cap: back to none once the doubled cap would not limit anything
            self.current_max_batch_size = None if doubled >= self.allocator.num_blocks else doubled

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    # ---- leaving -----------------------------------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (running or waiting) for good and free its KV blocks. Idempotent."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_s = self.clock()

    def abort(self, request_id: str) -> Sequence | None:
        """Finish a sequence with ABORT; returns it, or None for an unknown / already finished id."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, FinishReason.ABORT)
                return seq
        return None

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.slot_state = None
        seq.prefix_blocks, seq.prefix_key = 0, ROOT_KEY

    def _preempt(self, seq: Sequence) -> None:
        """Evict a running sequence back to the front of the queue; it will recompute from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.preemptions_total += 1

    def handle_oom(self, batch: ScheduledBatch) -> list[Sequence]:
        """React to an out-of-memory step: lower the batch cap, evict over-cap sequences, fail hopeless ones.

        The failed step wrote nothing the scheduler relies on (`num_computed_tokens` did not advance), so the
        batch's sequences simply run again. Each gets one more OOM strike; a sequence over `max_oom_retries`
        strikes is finished with ERROR and returned so the engine can fail it with 503.
        """
        self.oom_events_total += 1
        self._clean_steps = 0
        self.current_max_batch_size = max(1, len(self.running) // 2)
        failed: list[Sequence] = []
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue
            seq.oom_retries += 1
            if seq.oom_retries > self.config.max_oom_retries:
                self.finish(seq, FinishReason.ERROR)
                failed.append(seq)
        while len(self.running) > self.current_max_batch_size:
            self._preempt(self.running[-1])
        return failed

    # ---- gauges ----------------------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """True while anything is running or waiting."""
        return bool(self.running or self.waiting)

    @property
    def kv_used_tokens(self) -> int:
        """Cache slots holding K/V that running sequences use; a block shared through the prefix cache counts once
        (shared blocks are always full and computed, so each extra holder over-counts exactly one block)."""
        computed = sum(seq.num_computed_tokens for seq in self.running)
        return computed - self.allocator.num_extra_holders * self.block_size

    @property
    def kv_reserved_tokens(self) -> int:
        """Cache slots held by running sequences: the blocks of their prompt + max_tokens reservations, shared
        prefix blocks counted once."""
        return self.allocator.num_used_blocks * self.block_size
