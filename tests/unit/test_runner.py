"""The model runner on the tiny random Llama: packed batches over the paged KV cache match the plain HF model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.runner import ModelRunner, is_oom
from fitserve.server.engine.scheduler import Scheduler, Sequence
from fitserve.server.engine.types import SamplingParams


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def make_config(**overrides: object) -> EngineConfig:
    base: dict[str, object] = dict(served_model_name="tiny", max_model_len=512, kv_capacity_tokens=2048)
    base.update(overrides)
    return EngineConfig(**base)  # type: ignore[arg-type]


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 60, (n,), generator=gen).tolist()
    return [torch.randint(100, 40000, (length,), generator=gen).tolist() for length in lengths]


def reference_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    # Without the runner's batch metadata the paged attention function falls back to transformers' SDPA.
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def run_all(runner: ModelRunner, sched: Scheduler, seqs: list[Sequence], stagger: int = 0) -> None:
    pending = list(seqs)
    step = 0
    while pending or sched.has_work:
        if pending and step % max(stagger, 1) == 0:
            sched.add(pending.pop(0))
        if sched.has_work:
            batch = sched.schedule()
            sched.postprocess(batch, [s.token_id for s in runner.run(batch)])
        step += 1


def test_packed_greedy_matches_generate(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(6)
    max_tokens = [5, 12, 8, 3, 10, 7]
    refs = [reference_greedy(tiny_model, p, m) for p, m in zip(ps, max_tokens, strict=False)]
    cfg = make_config(max_prefill_tokens=128)
    runner = ModelRunner(tiny_model, cfg)
    sched = Scheduler(cfg)
    seqs = [
        Sequence(f"r{i}", list(p), len(p), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True), 0.0)
        for i, (p, m) in enumerate(zip(ps, max_tokens, strict=False))
    ]
    run_all(runner, sched, seqs, stagger=2)
    assert [s.output_token_ids for s in seqs] == refs
    assert sched.allocator.num_free == sched.allocator.num_blocks


def test_chunked_prefill_matches_full_forward(tiny_model) -> None:  # type: ignore[no-untyped-def]
    (prompt,) = prompts(1, seed=5)
    prompt = (prompt * 4)[:150]
    cfg = make_config(max_prefill_tokens=32)
    runner = ModelRunner(tiny_model, cfg)
    sched = Scheduler(cfg)
    seq = Sequence("c", list(prompt), len(prompt), SamplingParams(max_tokens=2, temperature=0), 0.0)
    sched.add(seq)
    chunks = 0
    while True:
        batch = sched.schedule()
        logits = runner.forward_logits(batch)
        chunks += 1
        if batch.prefills[0].sample:
            break
        sched.postprocess(batch, [])
    with torch.inference_mode():
        ref = tiny_model(torch.tensor([prompt]), logits_to_keep=1).logits[0, -1]
    assert chunks == 5
    torch.testing.assert_close(logits[0], ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_is_preallocated_once(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(kv_capacity_tokens=256, block_size_tokens=16)
    runner = ModelRunner(tiny_model, cfg)
    # 2 layers x (K + V) x (256 slots + one 16-slot scratch block for decode padding) x 2 kv heads x 16 dim x 4 B
    assert runner.cache.nbytes == 2 * 2 * (256 + 16) * 2 * 16 * 4
    ptrs = [t.data_ptr() for t in runner.cache.k]
    sched = Scheduler(cfg)
    seqs = [
        Sequence(f"r{i}", p, len(p), SamplingParams(max_tokens=4, temperature=0), 0.0) for i, p in enumerate(prompts(3))
    ]
    run_all(runner, sched, seqs)
    assert [t.data_ptr() for t in runner.cache.k] == ptrs


def test_injected_oom_is_a_real_torch_oom(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(oom_inject_steps=(1,))
    runner = ModelRunner(tiny_model, cfg)
    sched = Scheduler(cfg)
    sched.add(Sequence("o", [1, 2, 3], 3, SamplingParams(max_tokens=2, temperature=0), 0.0))
    batch = sched.schedule()
    with pytest.raises(torch.OutOfMemoryError) as ctx:
        runner.run(batch)
    assert is_oom(ctx.value)
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert len(runner.run(sched.schedule())) == 1  # step 2 runs normally


def test_batched_decode_attention_matches_per_sequence(tiny_model) -> None:  # type: ignore[no-untyped-def]
    ps = prompts(5, seed=9)
    logits_by_mode = []
    for batched in (False, True):
        cfg = make_config(batched_decode_attention=batched)
        runner = ModelRunner(tiny_model, cfg)
        sched = Scheduler(cfg)
        for i, p in enumerate(ps):
            sched.add(Sequence(f"r{i}", list(p), len(p), SamplingParams(max_tokens=6, temperature=0), 0.0))
        steps = []
        while sched.has_work:
            batch = sched.schedule()
            logits = runner.forward_logits(batch)
            steps.append((len(batch.decodes), logits))
            sched.postprocess(batch, logits.argmax(-1).tolist())
        logits_by_mode.append(steps)
    per_seq, grouped = logits_by_mode
    assert len(per_seq) == len(grouped) and any(n > 1 for n, _ in grouped)
    for (_, a), (_, b) in zip(per_seq, grouped, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_batched_decode_attention_only_while_its_gather_fits_the_plans_attention_scratch(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The padded K/V copy of every decode's context is transient memory the plan must have counted: a step whose
    copy would not fit in `attention_scratch_bytes` attends per sequence (same tokens, no batched gather)."""
    ps = prompts(4, seed=3)
    width = max(-(-(len(p) + 1) // 16) for p in ps) * 16  # the widest decode context, whole blocks
    shape = ModelRunner(tiny_model, make_config()).shape
    itemsize = next(tiny_model.parameters()).element_size()
    gather = len(ps) * width * 2 * shape.num_kv_heads * shape.head_dim * itemsize  # at the first decode step
    tokens = {}
    for cap in (None, gather, gather - 1):
        cfg = make_config(attention_scratch_bytes=cap)
        runner = ModelRunner(tiny_model, cfg)
        sched = Scheduler(cfg)
        for i, p in enumerate(ps):
            sched.add(Sequence(f"r{i}", list(p), len(p), SamplingParams(max_tokens=2, temperature=0), 0.0))
        batch = sched.schedule()  # every prefill in one step
        sched.postprocess(batch, [s.token_id for s in runner.run(batch)])
        batch = sched.schedule()
        assert len(batch.decodes) == len(ps) and not batch.prefills
        grouped = runner.prepare(batch)[3].decode_group is not None
        assert grouped is (cap != gather - 1)
        tokens[cap] = [s.token_id for s in runner.run(batch)]
    assert tokens[None] == tokens[gather] == tokens[gather - 1]
