"""Scheduler tests with a fake runner: admission by KV, queue bound, caps, chunking, stops, abort, OOM. No torch."""

from __future__ import annotations

import itertools

import pytest

from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.scheduler import ScheduledBatch, Scheduler, Sequence, SequenceStatus
from fitserve.server.engine.types import (
    FinishReason,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    SamplingParams,
)

EOS = 2
_ids = itertools.count()


def make_config(**overrides: object) -> EngineConfig:
    base: dict[str, object] = dict(
        served_model_name="fake",
        max_model_len=256,
        kv_capacity_tokens=128,
        max_batch_size=None,
        max_waiting=8,
        max_prefill_tokens=64,
        block_size_tokens=16,
    )
    base.update(overrides)
    return EngineConfig(**base)  # type: ignore[arg-type]


def make_seq(prompt_len: int, max_tokens: int, **params: object) -> Sequence:
    prompt = [10 + i % 50 for i in range(prompt_len)]
    return Sequence(f"r{next(_ids)}", prompt, prompt_len, SamplingParams(max_tokens=max_tokens, **params), 0.0)


def fake_run(batch: ScheduledBatch, token: int = 7) -> list[int]:
    """A fake runner: one `token` per sampling chunk."""
    return [token for c in batch.chunks if c.sample]


def run_to_completion(s: Scheduler, max_steps: int = 500) -> int:
    steps = 0
    while s.has_work and steps < max_steps:
        batch = s.schedule()
        s.postprocess(batch, fake_run(batch))
        steps += 1
    return steps


def test_admission_reserves_prompt_plus_max_tokens_and_waits_when_full() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=64), eos_token_ids=[EOS])
    a, b = make_seq(20, 12), make_seq(20, 12)  # 32 tokens = 2 blocks each
    c = make_seq(10, 6)  # 16 tokens = 1 block, but FIFO behind nothing once a and b run
    for seq in (a, b, c):
        s.add(seq)
    s.schedule()
    assert [q.status for q in (a, b)] == [SequenceStatus.RUNNING] * 2
    assert c.status is SequenceStatus.WAITING  # 4 blocks in use, none free
    assert s.kv_reserved_tokens == 64
    assert s.allocator.num_free == 0
    run_to_completion(s)
    assert all(q.finish_reason is FinishReason.LENGTH for q in (a, b, c))
    assert s.allocator.num_free == 4 and s.kv_reserved_tokens == 0 and s.kv_used_tokens == 0


def test_request_that_can_never_fit_is_rejected_at_once() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=64, max_model_len=100))
    with pytest.raises(PromptTooLongError) as ctx:
        s.add(make_seq(90, 20))  # 110 > max_model_len
    assert "context length" in str(ctx.value)
    with pytest.raises(PromptTooLongError, match="KV cache capacity"):
        s.add(make_seq(50, 20))  # 70 > 64 tokens of cache
    with pytest.raises(InvalidRequestError):
        s.add(make_seq(0, 5))
    assert not s.waiting


def test_waiting_queue_is_bounded() -> None:
    s = Scheduler(make_config(max_waiting=2, max_batch_size=1))
    s.add(make_seq(4, 4))  # starts at once: not waiting
    s.add(make_seq(4, 4))
    s.add(make_seq(4, 4))
    assert len(s.running) == 1 and len(s.waiting) == 2
    with pytest.raises(QueueFullError) as ctx:
        s.add(make_seq(4, 4))
    assert ctx.value.retry_after_s >= 1


def test_max_waiting_zero_runs_what_fits_and_refuses_the_rest() -> None:
    s = Scheduler(make_config(max_waiting=0, max_batch_size=2))
    s.add(make_seq(4, 4))
    s.add(make_seq(4, 4))
    with pytest.raises(QueueFullError):
        s.add(make_seq(4, 4))
    assert len(s.running) == 2 and not s.waiting
    while s.has_work:
        batch = s.schedule()
        s.postprocess(batch, [7] * batch.num_sampled)
    s.add(make_seq(4, 4))  # room again once the first two finished
    assert len(s.running) == 1


def test_max_batch_size_caps_running_sequences() -> None:
    s = Scheduler(make_config(max_batch_size=2, kv_capacity_tokens=1024))
    seqs = [make_seq(4, 3) for _ in range(5)]
    for seq in seqs:
        s.add(seq)
    peak = 0
    while s.has_work:
        batch = s.schedule()
        peak = max(peak, len(s.running))
        assert len(batch.chunks) <= 2
        s.postprocess(batch, fake_run(batch))
    assert peak == 2
    assert all(seq.num_output_tokens == 3 for seq in seqs)


def test_abort_frees_kv_of_running_and_waiting() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=64))
    a, b = make_seq(20, 40), make_seq(4, 4)
    s.add(a)
    s.add(b)
    s.schedule()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.WAITING
    assert s.abort(a.request_id) is a
    assert a.finish_reason is FinishReason.ABORT and a.block_table == []
    assert s.allocator.num_free == 4 and s.kv_reserved_tokens == 0
    assert s.abort(b.request_id) is b and not s.waiting
    assert s.abort("unknown") is None
    assert not s.has_work


def test_new_requests_join_running_batch_and_finished_leave_at_once() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024))
    a = make_seq(8, 10)
    s.add(a)
    for _ in range(3):
        batch = s.schedule()
        s.postprocess(batch, fake_run(batch))
    b = make_seq(8, 1)
    s.add(b)
    batch = s.schedule()  # b joins the very next step, next to a's decode
    assert [c.seq for c in batch.decodes] == [a] and [c.seq for c in batch.prefills] == [b]
    s.postprocess(batch, fake_run(batch))
    assert b.is_finished and b not in s.running  # max_tokens=1: leaves in the step it finished
    assert a in s.running


def test_chunked_prefill_splits_only_prompts_longer_than_the_budget() -> None:
    s = Scheduler(make_config(max_prefill_tokens=16, kv_capacity_tokens=1024))
    long, short = make_seq(40, 2), make_seq(10, 2)
    s.add(long)
    s.add(short)
    batch = s.schedule()
    assert [(c.seq, c.start, c.num_tokens, c.sample) for c in batch.prefills] == [(long, 0, 16, False)]
    s.postprocess(batch, fake_run(batch))
    batch = s.schedule()
    # the short prompt fits a budget but not what is left of this one: it waits instead of being split
    assert [(c.seq, c.start, c.num_tokens) for c in batch.prefills] == [(long, 16, 16)]
    s.postprocess(batch, fake_run(batch))
    batch = s.schedule()
    assert [(c.seq, c.start, c.num_tokens, c.sample) for c in batch.prefills] == [(long, 32, 8, True)]
    s.postprocess(batch, fake_run(batch))
    batch = s.schedule()
    assert [c.seq for c in batch.decodes] == [long]
    assert [(c.seq, c.num_tokens, c.sample) for c in batch.prefills] == [(short, 10, True)]
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 40


def test_stop_conditions() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024), eos_token_ids=[EOS])
    eos = make_seq(4, 10)
    ignore = make_seq(4, 3, ignore_eos=True)
    stop_id = make_seq(4, 10, stop_token_ids=(9,))
    for seq in (eos, ignore, stop_id):
        s.add(seq)
    batch = s.schedule()
    s.postprocess(batch, [EOS, EOS, 9])
    assert eos.finish_reason is FinishReason.STOP
    assert stop_id.finish_reason is FinishReason.STOP
    assert not ignore.is_finished
    run_to_completion(s)
    assert ignore.finish_reason is FinishReason.LENGTH and ignore.output_token_ids == [EOS, 7, 7]


def test_kv_used_tracks_computed_tokens() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024))
    a = make_seq(10, 5)
    s.add(a)
    batch = s.schedule()
    s.postprocess(batch, fake_run(batch))
    assert s.kv_used_tokens == 10  # the sampled token's K/V is written by the next step
    batch = s.schedule()
    s.postprocess(batch, fake_run(batch))
    assert s.kv_used_tokens == 11


def test_oom_lowers_cap_requeues_and_eventually_fails() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024, max_oom_retries=1))
    seqs = [make_seq(6, 8) for _ in range(4)]
    for seq in seqs:
        s.add(seq)
    batch = s.schedule()
    s.postprocess(batch, fake_run(batch))
    batch = s.schedule()
    failed = s.handle_oom(batch)  # the step raised OOM
    assert failed == []
    assert s.oom_events_total == 1 and s.current_max_batch_size == 2
    assert len(s.running) == 2 and s.preemptions_total == 2
    requeued = list(s.waiting)
    assert all(q.num_computed_tokens == 0 and q.block_table == [] for q in requeued)
    assert all(q.num_output_tokens == 1 for q in requeued)  # recomputed from prompt + generated tokens
    batch = s.schedule()
    assert len(batch.chunks) == 2
    failed = s.handle_oom(batch)  # second strike for the two running ones: over max_oom_retries
    assert sorted(q.request_id for q in failed) == sorted(q.request_id for q in seqs[:2])
    assert all(q.finish_reason is FinishReason.ERROR for q in failed)
    assert s.current_max_batch_size == 1
    run_to_completion(s)
    assert all(q.finish_reason is FinishReason.LENGTH for q in requeued)
    assert [q.output_token_ids for q in requeued] == [[7] * 8] * 2
    assert s.allocator.num_free == s.allocator.num_blocks


def test_requeued_sequence_recomputes_all_its_tokens_in_one_prefill() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024))
    a, b = make_seq(6, 8), make_seq(6, 8)
    s.add(a)
    s.add(b)
    for _ in range(3):
        batch = s.schedule()
        s.postprocess(batch, fake_run(batch))
    s.handle_oom(s.schedule())
    assert b.status is SequenceStatus.WAITING
    s.current_max_batch_size = 2  # pretend memory came back
    batch = s.schedule()
    (chunk,) = batch.prefills
    assert chunk.seq is b and chunk.start == 0 and chunk.num_tokens == 6 + 3 and chunk.sample


def test_lowered_cap_recovers_after_clean_steps() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024, max_batch_size=8, oom_recovery_steps=3))
    for _ in range(4):
        s.add(make_seq(4, 30))
    s.handle_oom(s.schedule())
    assert s.current_max_batch_size == 2
    caps = []
    for _ in range(9):
        batch = s.schedule()
        s.postprocess(batch, fake_run(batch))
        caps.append(s.current_max_batch_size)
    assert caps == [2, 2, 4, 4, 4, 8, 8, 8, 8]
    s.handle_oom(s.schedule())
    assert s.current_max_batch_size == 2  # half of the 4 running


def test_cap_never_recovers_when_disabled() -> None:
    s = Scheduler(make_config(kv_capacity_tokens=1024, oom_recovery_steps=None))
    for _ in range(2):
        s.add(make_seq(4, 10))
    s.handle_oom(s.schedule())
    run_to_completion(s)
    assert s.current_max_batch_size == 1


def test_add_group_takes_all_or_none() -> None:
    s = Scheduler(make_config(max_waiting=2, max_batch_size=1))
    s.add(make_seq(4, 4))
    group = [make_seq(4, 4) for _ in range(3)]  # none can start (cap 1 taken): 3 would wait, 2 may
    with pytest.raises(QueueFullError, match="all 3 requests"):
        s.add_group(group)
    assert len(s.waiting) == 0 and len(s.running) == 1
    s.add_group(group[:2])
    assert list(s.waiting) == group[:2]


def test_add_group_counts_what_starts_at_once() -> None:
    s = Scheduler(make_config(max_waiting=1, max_batch_size=3))
    group = [make_seq(4, 4) for _ in range(4)]  # three start now, one waits: fits a queue of one
    s.add_group(group)
    assert s.running == group[:3] and list(s.waiting) == group[3:]
