"""The compiled decode step: bucket choice, padded static inputs, and its logits against the eager runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.server.engine.compile_mode import CompileMode
from fitserve.server.engine.compiled_decode import (
    CompiledDecode,
    DecodeBuckets,
    DecodeRow,
    StaticDecodeInputs,
    resolve_mode,
)
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.kv_cache import PagedKVCache
from fitserve.server.engine.runner import ModelRunner
from fitserve.server.engine.scheduler import Scheduler, Sequence
from fitserve.server.engine.types import SamplingParams


def test_buckets_are_powers_of_two_up_to_the_limits() -> None:
    buckets = DecodeBuckets.build(max_batch_size=12, max_context_blocks=128)
    assert buckets.batch_sizes == (1, 2, 4, 8, 12)
    assert buckets.context_blocks == (8, 16, 32, 64, 128)
    assert DecodeBuckets.build(1, 3).context_blocks == (3,)
    with pytest.raises(ValueError):
        DecodeBuckets.build(0, 8)


def test_bucket_selection_rounds_up_and_gives_up_past_the_largest() -> None:
    buckets = DecodeBuckets.build(max_batch_size=16, max_context_blocks=64)
    assert buckets.select(1, 1) == (1, 8)
    assert buckets.select(3, 9) == (4, 16)
    assert buckets.select(16, 64) == (16, 64)
    assert buckets.select(17, 8) is None
    assert buckets.select(2, 65) is None
    assert buckets.all()[0] == (16, 64)  # largest first (CUDA graphs share one pool, captured big to small)
    assert len(buckets.all()) == 5 * 4


def test_static_inputs_pad_with_the_scratch_block() -> None:
    cache = PagedKVCache(1, num_blocks=10, block_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    assert cache.k[0].shape[0] == 11 * 4 and cache.scratch_block == 10 and cache.scratch_slot == 40
    inputs = StaticDecodeInputs(batch=4, context_blocks=3, cache=cache, device=torch.device("cpu"))
    ptr = inputs.block_tables.data_ptr()
    rows = [DecodeRow(token_id=7, position=5, block_table=[3, 6, 9]), DecodeRow(11, 0, [2])]
    inputs.fill(rows)
    assert inputs.input_ids.tolist() == [[7, 11, 0, 0]]
    assert inputs.position_ids.tolist() == [[5, 0, 0, 0]]
    # position 5 of the first row is block 6 (its second), offset 1; padding rows write the scratch slot
    assert inputs.slot_mapping.tolist() == [6 * 4 + 1, 2 * 4, 40, 40]
    # only the blocks a row's context reaches are real; the rest of the width, and padding rows, point at scratch
    assert inputs.block_tables.tolist() == [[3, 6, 10], [2, 10, 10], [10, 10, 10], [10, 10, 10]]
    assert inputs.context_lens.tolist() == [6, 1, 1, 1]
    assert inputs.block_tables.data_ptr() == ptr  # filled in place: the captured/compiled graph sees the same buffer
    with pytest.raises(ValueError):
        inputs.fill([DecodeRow(1, 12, [1, 2, 3, 4])])  # needs 4 blocks, the bucket holds 3
    with pytest.raises(ValueError):
        inputs.fill([DecodeRow(1, 0, [1])] * 5)


def test_mode_resolution_per_device() -> None:
    assert resolve_mode(CompileMode.AUTO, torch.device("cpu")) is CompileMode.OFF  # measured: no gain on CPU
    assert resolve_mode(CompileMode.INDUCTOR, torch.device("cpu")) is CompileMode.INDUCTOR
    assert resolve_mode(CompileMode.AUTO, torch.device("cuda:0")) is CompileMode.CUDA_GRAPHS
    assert resolve_mode(CompileMode.OFF, torch.device("cuda:0")) is CompileMode.OFF
    # layers (and their KV) on two GPUs: one graph cannot capture both, AUTO stays off and an explicit request fails
    assert resolve_mode(CompileMode.AUTO, torch.device("cuda:0"), num_cache_devices=2) is CompileMode.OFF
    assert resolve_mode(CompileMode.EAGER, torch.device("cuda:0"), num_cache_devices=2) is CompileMode.EAGER
    with pytest.raises(ValueError, match="spans 2"):
        resolve_mode(CompileMode.CUDA_GRAPHS, torch.device("cuda:0"), num_cache_devices=2)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_mode(CompileMode.CUDA_GRAPHS, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _decode_logits(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill `prompts` together, then run `steps` decode-only steps; the logits of each decode step."""
    cfg = runner.config
    sched = Scheduler(cfg)
    for i, p in enumerate(prompts):
        sched.add(Sequence(f"r{i}", list(p), len(p), SamplingParams(max_tokens=steps + 1, temperature=0), 0.0))
    out = []
    while sched.has_work:
        batch = sched.schedule()
        logits = runner.forward_logits(batch)
        if batch.decodes and not batch.prefills:
            out.append(logits.clone())
        sched.postprocess(batch, logits.argmax(-1).tolist())
    return out


@pytest.mark.parametrize(
    ("mode", "prepack"),
    [
        (CompileMode.EAGER, False),
        (CompileMode.EAGER, True),
        # inductor compiles for minutes on a busy 2-core CPU even for the 2-layer model: the integration suite's
        pytest.param(CompileMode.INDUCTOR, True, marks=pytest.mark.integration),
    ],
    ids=["eager-plain", "eager-onednn", "inductor-onednn"],
)
def test_compiled_decode_matches_the_eager_runner(tiny_model, mode: CompileMode, prepack: bool) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    base = dict(served_model_name="tiny", max_model_len=64, kv_capacity_tokens=512, max_batch_size=4)
    eager = ModelRunner(tiny_model, EngineConfig(**base, prepack_cpu_linears=prepack))  # type: ignore[arg-type]
    expected = _decode_logits(eager, prompts, steps=10)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = ModelRunner(
        tiny_model,
        EngineConfig(**base, prepack_cpu_linears=prepack, compile_mode=mode),  # type: ignore[arg-type]
    )
    assert compiled.compiled_decode is not None and compiled.compile_mode is mode
    if mode is not CompileMode.EAGER:  # every bucket was built at construction: no request compiles
        assert set(compiled.compiled_decode._runners) == {(1, 4), (2, 4), (4, 4)}
        # batch 1 is one graph, batches 2 and 4 share the other (batch dimension dynamic)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 2
    got = _decode_logits(compiled, prompts, steps=10)
    assert len(got) == len(expected) == 10
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
        assert g.argmax(-1).tolist() == e.argmax(-1).tolist()


def test_a_step_beyond_the_buckets_runs_eagerly(tiny_model) -> None:  # type: ignore[no-untyped-def]
    cfg = EngineConfig(
        served_model_name="tiny",
        max_model_len=64,
        kv_capacity_tokens=512,
        max_batch_size=None,
        max_compiled_batch_size=1,
        compile_mode=CompileMode.EAGER,
    )
    runner = ModelRunner(tiny_model, cfg)
    assert runner.compiled_decode is not None
    rows = [DecodeRow(5, 3, [0]), DecodeRow(6, 3, [1])]
    assert runner.compiled_decode.run(rows) is None  # two decodes, the largest bucket holds one
    logits = _decode_logits(runner, [[101, 102, 103, 104], [201, 202, 203, 204]], steps=2)
    assert len(logits) == 2 and logits[0].shape[0] == 2


@pytest.mark.gpu
def test_cuda_graph_decode_matches_eager_on_cuda(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).to("cuda").eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 40, 17)]
    base = dict(served_model_name="tiny", max_model_len=64, kv_capacity_tokens=512, max_batch_size=4, device="cuda")
    expected = _decode_logits(ModelRunner(model, EngineConfig(**base)), prompts, steps=10)  # type: ignore[arg-type]
    runner = ModelRunner(model, EngineConfig(**base, compile_mode=CompileMode.AUTO))  # type: ignore[arg-type]
    assert isinstance(runner.compiled_decode, CompiledDecode) and runner.compile_mode is CompileMode.CUDA_GRAPHS
    got = _decode_logits(runner, prompts, steps=10)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2)


def test_batched_decode_attention_on_the_eager_path_uses_the_same_paged_gather(tiny_model) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (3, 33, 20)]
    base = dict(served_model_name="tiny", max_model_len=64, kv_capacity_tokens=512, max_batch_size=4)
    expected = _decode_logits(ModelRunner(tiny_model, EngineConfig(**base)), prompts, steps=6)  # type: ignore[arg-type]
    batched = ModelRunner(tiny_model, EngineConfig(**base, batched_decode_attention=True))  # type: ignore[arg-type]
    got = _decode_logits(batched, prompts, steps=6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_inductor_on_cpu_is_planned_with_its_runtime_memory(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU the budget is the process's memory: compiling the decode step (inductor) holds ~400 MiB more, so the
    plan counts `INDUCTOR_CPU_RUNTIME_BYTES` in its overhead; modes that compile nothing add nothing, and AUTO adds
    exactly what its choice says."""
    from fitserve.quant import load
    from fitserve.server import serve
    from fitserve.server.engine.compile_mode import INDUCTOR_CPU_RUNTIME_BYTES
    from fitserve.server.settings import Settings

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(load, "measure_cpu_runtime_bytes", lambda: 300 << 20)  # the same process state each time
    monkeypatch.setattr("fitserve.quant.budget.nvidia_driver_present", lambda: False)
    planned = {
        mode: serve.plan_serving(
            Settings(model=str(tiny_model_dir), memory_budget="4GiB", max_model_len=128, compile_mode=mode)
        )
        for mode in (CompileMode.OFF, CompileMode.AUTO, CompileMode.EAGER, CompileMode.INDUCTOR)
    }
    overhead = {mode: p.plan.overhead_bytes for mode, p in planned.items()}
    assert overhead[CompileMode.EAGER] == overhead[CompileMode.OFF]
    assert overhead[CompileMode.AUTO] == overhead[CompileMode.OFF] + planned[CompileMode.AUTO].compile.runtime_bytes
    assert overhead[CompileMode.INDUCTOR] - overhead[CompileMode.OFF] == INDUCTOR_CPU_RUNTIME_BYTES


def test_auto_on_cpu_compiles_batch_one_for_weight_only_kernels_within_the_spare_budget() -> None:
    from fitserve.server.engine.compile_mode import INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES as ONE
    from fitserve.server.engine.compile_mode import CpuLinearKernels, choose_cpu_compile

    weight_only = CpuLinearKernels.WEIGHT_ONLY
    compiled = choose_cpu_compile(CompileMode.AUTO, weight_only, spare_bytes=ONE, dense_weight_bytes=1 << 30)
    assert (compiled.mode, compiled.max_compiled_batch_size, compiled.runtime_bytes) == (CompileMode.INDUCTOR, 1, ONE)
    assert compiled.dense_copy_bytes == 0  # weight-only kernels read their own buffers: no dense copy
    short = choose_cpu_compile(CompileMode.AUTO, weight_only, spare_bytes=ONE - 1)
    assert (short.mode, short.runtime_bytes) == (CompileMode.OFF, 0) and "spare" in short.reason
    assert compiled.fallback_to_eager  # a mode AUTO chose may not stop the server from starting
    no_compiler = choose_cpu_compile(CompileMode.AUTO, weight_only, spare_bytes=ONE, compiler_available=False)
    assert no_compiler.mode is CompileMode.OFF and "compiler" in no_compiler.reason
    other = choose_cpu_compile(CompileMode.AUTO, CpuLinearKernels.OTHER, spare_bytes=1 << 40)
    assert (other.mode, other.runtime_bytes) == (CompileMode.OFF, 0)
    # an explicit mode is kept whatever the precision; its bytes were planned before the precision was chosen
    explicit = choose_cpu_compile(CompileMode.INDUCTOR, CpuLinearKernels.OTHER, spare_bytes=0)
    assert (explicit.mode, explicit.max_compiled_batch_size) == (CompileMode.INDUCTOR, None)
    assert not explicit.fallback_to_eager  # asked for by name: a failed build fails the start
    assert choose_cpu_compile(CompileMode.OFF, weight_only, spare_bytes=1 << 40).mode is CompileMode.OFF


def test_auto_on_cpu_compiles_dense_bf16_only_with_room_for_the_dense_copies() -> None:
    """oneDNN-packed bf16 compiles batch 1 with `matvec` over dense weights kept beside the packed ones: the plan
    needs the compiled step's bytes plus a copy of the weights, or the step stays eager."""
    from fitserve.server.engine.compile_mode import INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES as ONE
    from fitserve.server.engine.compile_mode import CpuLinearKernels, choose_cpu_compile

    weights = 300 << 20
    dense = CpuLinearKernels.DENSE_PACKED
    compiled = choose_cpu_compile(CompileMode.AUTO, dense, spare_bytes=ONE + weights, dense_weight_bytes=weights)
    assert (compiled.mode, compiled.max_compiled_batch_size) == (CompileMode.INDUCTOR, 1)
    assert (compiled.runtime_bytes, compiled.dense_copy_bytes) == (ONE + weights, weights)
    assert "dense weights" in compiled.reason and compiled.fallback_to_eager
    short = choose_cpu_compile(CompileMode.AUTO, dense, spare_bytes=ONE + weights - 1, dense_weight_bytes=weights)
    assert (short.mode, short.runtime_bytes, short.dense_copy_bytes) == (CompileMode.OFF, 0, 0)
    explicit = choose_cpu_compile(CompileMode.INDUCTOR, dense, spare_bytes=1 << 40, dense_weight_bytes=weights)
    assert explicit.dense_copy_bytes == 0  # only AUTO plans the copies


def test_serve_keeps_dense_bf16_weights_when_auto_compiles(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fitserve serve --precision bf16` with room to spare on a CPU with native bf16: the plan counts the compiled
    step and the packed copies, and the engine keeps the dense weights with that much more packing allowance."""
    from types import SimpleNamespace

    from fitserve.quant import load
    from fitserve.server import serve
    from fitserve.server.engine import cpu_linear
    from fitserve.server.engine.compile_mode import INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES as ONE
    from fitserve.server.settings import Settings

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(load, "measure_cpu_runtime_bytes", lambda: 300 << 20)
    monkeypatch.setattr("fitserve.quant.budget.nvidia_driver_present", lambda: False)
    monkeypatch.setattr(cpu_linear, "packable_dtypes", lambda: frozenset({torch.float32, torch.bfloat16}))
    monkeypatch.setattr("fitserve.server.engine.compiled_decode.cpu_compiler_available", lambda: True)

    def planned(mode: CompileMode) -> serve.PlannedServing:
        settings = Settings(
            model=str(tiny_model_dir), memory_budget="4GiB", max_model_len=128, precision="bf16", compile_mode=mode
        )
        return serve.plan_serving(settings)

    eager, auto = planned(CompileMode.OFF), planned(CompileMode.AUTO)
    weights = eager.plan.weights_bytes
    assert auto.compile.mode is CompileMode.INDUCTOR and auto.compile.dense_copy_bytes == weights
    assert auto.plan.overhead_bytes - eager.plan.overhead_bytes == ONE + weights
    assert auto.plan.spare_bytes == eager.plan.spare_bytes - ONE - weights
    settings = Settings(model=str(tiny_model_dir), memory_budget="4GiB", max_model_len=128, precision="bf16")
    config = serve.engine_config(SimpleNamespace(planned=auto), settings)  # type: ignore[arg-type]
    assert config.keep_dense_cpu_linears and config.max_compiled_batch_size == 1
    assert config.spare_bytes == auto.plan.spare_bytes + weights  # the copies' allowance comes back to the packer
    assert not serve.engine_config(SimpleNamespace(planned=eager), settings).keep_dense_cpu_linears  # type: ignore[arg-type]


@pytest.mark.parametrize(("budget", "compiles"), [("4GiB", True), ("0", False)])
def test_serve_plans_the_auto_compiled_step_in_the_overhead(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: str, compiles: bool
) -> None:
    """`--precision int8` on CPU with AUTO: with room to spare the plan moves the compiled step's bytes from spare to
    overhead and the engine compiles batch 1 only; at a budget without that room the step stays eager."""
    from fitserve.quant import load
    from fitserve.server import serve
    from fitserve.server.engine.compile_mode import INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES as ONE
    from fitserve.server.settings import Settings

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(load, "measure_cpu_runtime_bytes", lambda: 300 << 20)
    monkeypatch.setattr("fitserve.quant.budget.nvidia_driver_present", lambda: False)

    def planned(memory_budget: str, mode: CompileMode) -> serve.PlannedServing:
        settings = Settings(
            model=str(tiny_model_dir),
            memory_budget=memory_budget,
            max_model_len=128,
            precision="int8",
            compile_mode=mode,
        )
        return serve.plan_serving(settings)

    eager = planned("4GiB", CompileMode.OFF).plan
    if not compiles:  # the smallest budget int8 fits in, then a little more: the spare is far below the step's bytes
        budget = str(eager.total_bytes + (8 << 20))
    auto = planned(budget, CompileMode.AUTO)
    if compiles:
        assert auto.compile.mode is CompileMode.INDUCTOR and auto.compile.max_compiled_batch_size == 1
        assert auto.plan.overhead_bytes - eager.overhead_bytes == ONE
        assert auto.plan.spare_bytes == eager.spare_bytes - ONE and auto.plan.total_bytes == eager.total_bytes + ONE
        assert "compiled (inductor" in auto.plan.reason
    else:
        assert auto.compile.mode is CompileMode.OFF and "spare" in auto.plan.reason
        assert auto.plan.overhead_bytes == planned(budget, CompileMode.OFF).plan.overhead_bytes


@pytest.mark.parametrize("fallback", [True, False])
def test_a_failed_decode_step_build_falls_back_to_eager_only_when_allowed(
    tiny_model, monkeypatch: pytest.MonkeyPatch, fallback: bool
) -> None:  # type: ignore[no-untyped-def]
    """A compile that fails at start-up (here: inductor without a C++ compiler, simulated) leaves a server that AUTO
    configured on eager steps with the same logits; a mode asked for by name fails the start."""

    def no_compiler(self: CompiledDecode) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")

    base = dict(served_model_name="tiny", max_model_len=64, kv_capacity_tokens=512, max_batch_size=4)
    expected = _decode_logits(ModelRunner(tiny_model, EngineConfig(**base)), [[101, 102, 103]], steps=3)  # type: ignore[arg-type]
    monkeypatch.setattr(CompiledDecode, "warm_up", no_compiler)
    config = EngineConfig(**base, compile_mode=CompileMode.INDUCTOR, compile_fallback_to_eager=fallback)  # type: ignore[arg-type]
    if not fallback:
        with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
            ModelRunner(tiny_model, config)
        return
    runner = ModelRunner(tiny_model, config)
    assert runner.compiled_decode is None and runner.compile_mode is CompileMode.OFF
    for g, e in zip(_decode_logits(runner, [[101, 102, 103]], steps=3), expected, strict=True):
        torch.testing.assert_close(g, e)


def test_the_compiler_check_follows_inductors_search() -> None:
    from torch._inductor import config as inductor_config

    from fitserve.server.engine.compiled_decode import cpu_compiler_available

    # inductor's own patch: monkeypatch.setattr on its config deletes `cpp.cxx` when it undoes the patch, and every
    # later compiler check in the session then fails
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-fitserve")}):
        assert cpu_compiler_available() is False
    assert inductor_config.cpp.cxx != (None, "no-such-compiler-fitserve")
