"""The precision ladder on fake models and fake devices: choice, KV capacity, errors, multi-GPU split."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from fitserve.quant.budget import GIB, MIB, BudgetError
from fitserve.quant.estimate import ModelShape, estimate_precision, layer_weights_bytes
from fitserve.quant.plan import NothingFitsError, Plan, PlanInputError, PlanRequest, make_plan
from fitserve.quant.schemes import DType, GptqParams, KernelBackend, LinearShape, Precision, backend_for
from tests.unit.test_budget import FakeProbe


def fake_shape(prequantized: Precision | None = None) -> ModelShape:
    """A 1B-ish Llama: 16 layers, hidden 2048, 8 KV heads of 64, vocab 32000, untied."""
    layer = [
        LinearShape(2048, 2048),
        LinearShape(512, 2048),
        LinearShape(512, 2048),
        LinearShape(2048, 2048),
        LinearShape(8192, 2048),
        LinearShape(8192, 2048),
        LinearShape(2048, 8192),
    ]
    linears = tuple(layer * 16)
    dense = 2 * 32000 * 2048 + 33 * 2048  # embeddings + lm_head + norms
    total = dense + sum(lin.numel for lin in linears)
    return ModelShape(
        model_path="/fake/model",
        architecture="LlamaForCausalLM",
        num_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_kv_heads=8,
        head_dim=64,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        total_params=total,
        dense_params=dense,
        buffer_bytes=256,
        linears=linears,
        prequantized=prequantized,
        gptq=GptqParams(4, 128) if prequantized is Precision.GPTQ else None,
        config_dtype="bfloat16",
    )


SHAPE = fake_shape()


SCRATCH_TOKENS = 16  # the KV cache's scratch block (one 16-token block no sequence owns)


def need(
    precision: Precision,
    dtype: DType = DType.BFLOAT16,
    n_cuda: int = 0,
    max_model_len: int = 2048,
    backend: KernelBackend | None = None,
) -> int:
    """Minimum total bytes for one full-length sequence, computed independently of the planner: what serving
    needs, or on CPU the load's peak when that is more (on the precision's default kernels for the device unless
    `backend` is given)."""
    backend = backend or backend_for(precision, on_cuda=n_cuda > 0)
    est = estimate_precision(
        SHAPE,
        precision,
        dtype,
        max_batch_tokens=2048,
        max_num_seqs=8,
        max_model_len=max_model_len,
        n_cuda_devices=n_cuda,
        backend=backend,
    )
    kv_slots = max_model_len + SCRATCH_TOKENS  # the engine's cache holds one scratch block beyond the capacity
    serving = est.weights_bytes + est.quant_state_bytes + est.overhead_bytes + est.kv_bytes_per_token * kv_slots
    return max(serving, est.load_peak_bytes)


def plan_for(budget_bytes: int, probe: FakeProbe | None = None, **kwargs: object) -> Plan:
    request = PlanRequest(model="/fake/model", memory_budget_bytes=budget_bytes, **kwargs)
    return make_plan(request, probe=probe or FakeProbe(), shape=SHAPE)


GPU = FakeProbe(gpus=[(80 * GIB, 81 * GIB)])


def gpu_need(precision: Precision, max_model_len: int = 2048) -> int:
    """`need` on one GPU: no CPU runtime and no CPU load peak, so the ladder's order is the weights' order."""
    return need(precision, n_cuda=1, max_model_len=max_model_len)


def gpu_plan_for(budget_bytes: int, **kwargs: object) -> Plan:
    return plan_for(budget_bytes, probe=GPU, **kwargs)


def test_needs_are_ordered_like_the_ladder() -> None:
    assert gpu_need(Precision.BF16) > gpu_need(Precision.INT8) > gpu_need(Precision.NF4)
    # on CPU torch's weight-only rungs give each Linear's checkpoint pages back as they quantize it, so they stay
    # below bf16; bitsandbytes quantizes from 16-bit copies while the whole checkpoint is mapped, so its load peak
    # puts its rungs above bf16 at one sequence of the default context
    bnb = KernelBackend.BITSANDBYTES
    assert need(Precision.INT4) < need(Precision.INT8) < need(Precision.BF16)
    assert need(Precision.BF16) < need(Precision.INT8, backend=bnb) < need(Precision.NF4, backend=bnb)


def test_big_budget_chooses_16_bit() -> None:
    plan = plan_for(64 * GIB)
    assert plan.precision is Precision.BF16 and plan.kv_dtype == "bfloat16"
    assert [c.precision for c in plan.candidates] == [Precision.BF16, Precision.INT8, Precision.INT4]
    assert all(c.fits for c in plan.candidates)


def test_between_int8_and_16_bit_chooses_int8() -> None:
    budget = (gpu_need(Precision.BF16) + gpu_need(Precision.INT8)) // 2
    plan = gpu_plan_for(budget)
    assert plan.precision is Precision.INT8
    assert not plan.candidates[0].fits and plan.candidates[0].shortfall_bytes == gpu_need(Precision.BF16) - budget
    assert "bf16 short by" in plan.reason


def test_between_nf4_and_int8_chooses_nf4() -> None:
    plan = gpu_plan_for((gpu_need(Precision.INT8) + gpu_need(Precision.NF4)) // 2)
    assert plan.precision is Precision.NF4


def test_exactly_the_need_fits() -> None:
    plan = gpu_plan_for(gpu_need(Precision.NF4))
    assert plan.precision is Precision.NF4 and plan.kv_capacity_tokens == 2048
    cpu = plan_for(need(Precision.BF16))
    assert cpu.precision is Precision.BF16 and cpu.kv_capacity_tokens == 2048


@pytest.mark.parametrize("backend", ["torch", "bitsandbytes"])
def test_on_cpu_a_quantized_load_peak_is_part_of_its_minimum(backend: str) -> None:
    """A CPU load quantizes from the checkpoint's pages (bitsandbytes from 16-bit copies too): loading INT8 and
    the 4-bit rung peaks above what they serve in."""
    plan = plan_for(64 * GIB, quant_backend=backend)
    four_bit = Precision.INT4 if backend == "torch" else Precision.NF4
    for cand in plan.candidates:
        serving = cand.weights_bytes + cand.quant_state_bytes + cand.overhead_bytes + cand.min_kv_bytes
        assert cand.total_bytes == max(serving, cand.load_peak_bytes)
    by_precision = {c.precision: c for c in plan.candidates}
    assert by_precision[Precision.BF16].load_peak_bytes < by_precision[Precision.BF16].total_bytes  # mapped file
    assert by_precision[four_bit].load_peak_bytes == by_precision[four_bit].total_bytes
    assert by_precision[Precision.INT8].load_peak_bytes == by_precision[Precision.INT8].total_bytes
    four = need(four_bit, backend=KernelBackend(backend))
    with pytest.raises(NothingFitsError, match="Loading it peaks at"):
        plan_for(four - 1, precision=four_bit.value, quant_backend=backend)
    assert plan_for(four, precision=four_bit.value, quant_backend=backend).precision is four_bit
    assert all(c.load_peak_bytes == 0 for c in gpu_plan_for(64 * GIB).candidates)  # a GPU loads in its own memory


def test_measured_cpu_runtime_replaces_the_estimate() -> None:
    estimated = plan_for(8 * GIB)
    measured = plan_for(8 * GIB, cpu_runtime_bytes=100 * MIB)
    assert estimated.overhead_bytes - measured.overhead_bytes == (288 - 100) * MIB


def test_kv_capacity_is_what_the_budget_leaves() -> None:
    budget = 8 * GIB
    plan = plan_for(budget, max_num_seqs=256)
    fixed = plan.weights_bytes + plan.quant_state_bytes + plan.overhead_bytes
    assert plan.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2
    slots = (budget - fixed) // plan.kv_bytes_per_token
    assert plan.kv_capacity_tokens == (slots - SCRATCH_TOKENS) // 16 * 16  # whole blocks beside the scratch block
    assert plan.kv_capacity_blocks * plan.block_size_tokens == plan.kv_capacity_tokens
    assert plan.max_concurrent_seqs_full_context == plan.kv_capacity_tokens // 2048
    assert plan.max_concurrent_seqs_typical == plan.kv_capacity_tokens // 512
    assert plan.total_bytes <= budget


def test_kv_capacity_capped_by_useful_tokens_and_max_kv_tokens() -> None:
    assert plan_for(64 * GIB).kv_capacity_tokens == 8 * 2048  # default max_num_seqs 8
    assert plan_for(64 * GIB, max_num_seqs=4).kv_capacity_tokens == 4 * 2048
    assert plan_for(64 * GIB, max_kv_tokens=5000).kv_capacity_tokens == 4992  # whole blocks of 16
    assert plan_for(64 * GIB, max_kv_tokens=5000, block_size_tokens=8).kv_capacity_tokens == 5000


def test_min_concurrency_raises_the_need() -> None:
    budget = gpu_need(Precision.BF16) + 1000
    assert gpu_plan_for(budget).precision is Precision.BF16
    plan = gpu_plan_for(budget, min_concurrency=4)
    assert plan.precision is Precision.INT8 and plan.kv_capacity_tokens >= 4 * 2048


def test_nothing_fits_names_need_budget_shortfall_and_remedies() -> None:
    budget = 40 * MIB
    with pytest.raises(NothingFitsError) as info:
        plan_for(budget)
    message = str(info.value)
    int4 = need(Precision.INT4)
    assert "int4" in message and str(int4) in message and str(budget) in message
    assert str(int4 - budget) in message
    assert "--max-model-len" in message and "--memory-budget" in message and "GPU" in message
    plan = info.value.plan
    assert plan.precision is None and plan.to_json()["chosen"] is None
    assert len(plan.candidates) == 3 and not any(c.fits for c in plan.candidates)


def test_nothing_fits_suggests_a_context_that_fits() -> None:
    budget = gpu_need(Precision.NF4, max_model_len=1024)
    with pytest.raises(NothingFitsError) as info:
        gpu_plan_for(budget)
    suggested = int(str(info.value).split("--max-model-len: ")[1].split()[0])
    assert 1024 <= suggested < 2048
    assert gpu_plan_for(budget, max_model_len=suggested).precision is Precision.NF4


def test_forced_precision_that_does_not_fit_says_by_how_much() -> None:
    budget = gpu_need(Precision.INT8)
    with pytest.raises(NothingFitsError) as info:
        gpu_plan_for(budget, precision="bf16")
    assert str(gpu_need(Precision.BF16) - budget) in str(info.value) and "--force" in str(info.value)


def test_force_loads_it_anyway() -> None:
    plan = gpu_plan_for(gpu_need(Precision.INT8), precision="bf16", force=True)
    assert plan.precision is Precision.BF16 and "--force" in plan.reason


def test_forced_precision_that_fits() -> None:
    plan = plan_for(64 * GIB, precision=Precision.NF4)
    assert plan.precision is Precision.NF4 and [c.precision for c in plan.candidates] == [Precision.NF4]


def test_fp32_forced_uses_fp32_everything() -> None:
    plan = plan_for(64 * GIB, precision="fp32")
    assert plan.kv_dtype == "float32" and plan.kv_bytes_per_token == 2 * 16 * 8 * 64 * 4
    assert plan.weights_bytes == SHAPE.total_params * 4 + 256


def test_fp16_on_a_gpu_without_bf16() -> None:
    probe = FakeProbe(gpus=[(16 * GIB, 16 * GIB)], bf16=False)
    plan = make_plan(PlanRequest(model="/fake/model"), probe=probe, shape=SHAPE)
    assert plan.precision is Precision.FP16 and plan.kv_dtype == "float16"
    assert plan.device == "cuda:0" and plan.device_map == "cuda:0" and plan.max_memory is None
    assert plan.candidates[0].overhead_bytes > 512 * MIB  # CUDA context counted


def test_bf16_on_a_gpu_with_bf16() -> None:
    probe = FakeProbe(gpus=[(16 * GIB, 16 * GIB)], bf16=True)
    assert make_plan(PlanRequest(model="/fake/model"), probe=probe, shape=SHAPE).precision is Precision.BF16


def test_multi_gpu_device_map_and_max_memory() -> None:
    probe = FakeProbe(gpus=[(6 * GIB, 8 * GIB), (3 * GIB, 8 * GIB)])
    plan = make_plan(PlanRequest(model="/fake/model", device="cuda"), probe=probe, shape=SHAPE)
    reserve = 512 * MIB
    assert plan.device == "cuda" and plan.device_map == "auto"
    assert plan.budget_bytes == 9 * GIB - 2 * reserve
    assert plan.max_memory is not None and set(plan.max_memory) == {0, 1}
    weights = plan.weights_bytes + plan.quant_state_bytes
    assert sum(plan.max_memory.values()) >= weights  # room for every weight
    assert plan.max_memory[0] <= 6 * GIB - reserve and plan.max_memory[1] <= 3 * GIB - reserve
    assert plan.max_memory[0] > plan.max_memory[1]  # split follows the budget
    assert plan.to_json()["max_memory"] == {"0": plan.max_memory[0], "1": plan.max_memory[1]}


def test_fp32_first_by_default_on_cpu_without_native_bf16() -> None:
    plan = plan_for(64 * GIB, probe=FakeProbe(native_bf16=False))
    assert plan.precision is Precision.FP32 and "fp32 compute is faster" in plan.reason
    assert [c.precision for c in plan.candidates] == [Precision.FP32, Precision.BF16, Precision.INT8, Precision.INT4]
    assert plan.kv_bytes_per_token == 2 * SHAPE.num_layers * SHAPE.num_kv_heads * SHAPE.head_dim * 4  # fp32 KV
    tight = plan_for(need(Precision.BF16), probe=FakeProbe(native_bf16=False))
    assert tight.precision is Precision.BF16  # fp32 does not fit: the ladder goes on
    # the quantized rungs keep bf16 dense layers, so their minimum budgets are those of the plain ladder
    plain = {c.precision: c.total_bytes for c in plan_for(64 * GIB).candidates}
    for cand in plan.candidates[1:]:
        assert cand.total_bytes == plain[cand.precision]


def test_prefer_fp32_can_be_turned_off() -> None:
    plan = plan_for(64 * GIB, probe=FakeProbe(native_bf16=False), prefer_fp32_on_cpu=False)
    assert plan.precision is Precision.BF16 and Precision.FP32 not in [c.precision for c in plan.candidates]


def test_prefer_fp32_ignored_on_cpu_with_native_bf16() -> None:
    plan = plan_for(64 * GIB, probe=FakeProbe(native_bf16=True))
    assert plan.precision is Precision.BF16


def test_prequantized_gptq_is_loaded_as_it_is() -> None:
    shape = fake_shape(Precision.GPTQ)
    plan = make_plan(PlanRequest(model="/fake", memory_budget_bytes=8 * GIB), probe=FakeProbe(), shape=shape)
    assert plan.precision is Precision.GPTQ and plan.prequantized
    assert plan.weights_bytes < need(Precision.INT8)
    with pytest.raises(PlanInputError, match="pre-quantized gptq"):
        make_plan(PlanRequest(model="/fake", precision="bf16"), probe=FakeProbe(), shape=shape)


def test_gptq_cannot_be_asked_of_a_dense_model() -> None:
    with pytest.raises(PlanInputError, match="does not quantize to GPTQ"):
        plan_for(8 * GIB, precision="gptq")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_model_len": 8192}, PlanInputError),  # beyond max_position_embeddings
        ({"max_model_len": 0}, ValueError),
        ({"min_concurrency": 0}, ValueError),
        ({"precision": "int3"}, ValueError),
        ({"max_kv_tokens": 100}, PlanInputError),
        ({"max_num_seqs": 2, "min_concurrency": 3}, PlanInputError),
    ],
)
def test_bad_requests(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        plan_for(8 * GIB, **kwargs)


def test_bad_device() -> None:
    with pytest.raises(BudgetError):
        plan_for(8 * GIB, device="tpu:0")


def test_none_means_default_for_server_settings() -> None:
    request = PlanRequest(model="/m", max_num_seqs=None, max_batch_tokens=None)
    assert request.max_num_seqs == 8 and request.max_batch_tokens == 2048


def test_json_has_the_issue_keys() -> None:
    out = gpu_plan_for((gpu_need(Precision.BF16) + gpu_need(Precision.INT8)) // 2).to_json()
    for key in ("budget_bytes", "device", "chosen", "reason", "candidates"):
        assert key in out
    assert out["chosen"] == "int8"
    for cand in out["candidates"]:
        for key in (
            "precision",
            "weights_bytes",
            "kv_bytes_per_token",
            "overhead_bytes",
            "total_bytes",
            "fits",
            "kv_capacity_tokens",
        ):
            assert key in cand
    assert [c["fits"] for c in out["candidates"]] == [False, True, True]


def test_table_and_verdict_render() -> None:
    from rich.console import Console

    plan = plan_for(8 * GIB)
    console = Console(width=200, record=True)
    console.print(plan.to_table())
    text = console.export_text()
    assert "bf16" in text and "int8" in text and "int4" in text and "yes" in text
    assert plan.verdict().startswith("BF16 on cpu")


@pytest.mark.parametrize(("budget", "seqs"), [(need(Precision.BF16) + 12345, 8), (5 * GIB + 777, 256), (8 * GIB, 256)])
def test_capacity_is_whole_blocks_and_spare_is_the_rest(budget: int, seqs: int) -> None:
    plan = plan_for(budget, max_num_seqs=seqs)
    assert plan.kv_capacity_tokens % plan.block_size_tokens == 0
    used = plan.weights_bytes + plan.quant_state_bytes + plan.overhead_bytes
    assert plan.total_bytes == used + (plan.kv_capacity_tokens + SCRATCH_TOKENS) * plan.kv_bytes_per_token
    assert plan.spare_bytes == budget - plan.total_bytes >= 0
    assert plan.spare_bytes < (plan.block_size_tokens + 1) * plan.kv_bytes_per_token  # at most a block unspent
    (share,) = plan.device_split
    assert (share.device, share.num_layers, share.kv_capacity_tokens) == ("cpu", 16, plan.kv_capacity_tokens)
    assert share.spare_bytes == plan.spare_bytes
    out = plan.to_json()
    assert out["kv_capacity_blocks"] == plan.kv_capacity_tokens // 16 and out["spare_bytes"] == plan.spare_bytes


def test_capped_capacity_leaves_spare_bytes() -> None:
    plan = plan_for(8 * GIB)  # 8 x 2048 tokens is far less than 8 GiB buys
    assert plan.kv_capacity_tokens == 8 * 2048
    assert plan.spare_bytes == 8 * GIB - plan.total_bytes > GIB


def test_odd_context_length_counts_whole_blocks() -> None:
    plan = plan_for(64 * GIB, max_model_len=100, max_num_seqs=3)
    assert plan.kv_capacity_tokens == 3 * 112  # 100 tokens occupy 7 blocks of 16
    exact = plan_for(need(Precision.BF16, max_model_len=100) + 12 * plan.kv_bytes_per_token, max_model_len=100)
    assert exact.precision is Precision.BF16 and exact.kv_capacity_tokens == 112


def _two_gpu_plan(free0: int, free1: int, **kwargs: object) -> Plan:
    probe = FakeProbe(gpus=[(free0, free0 + GIB), (free1, free1 + GIB)])  # reserve: 512 MiB each
    shape = replace(SHAPE, layers_module="model.layers")
    request = PlanRequest(model="/fake/model", device="cuda", max_num_seqs=4096, **kwargs)
    return make_plan(request, probe=probe, shape=shape)


@pytest.mark.parametrize(("free0", "free1"), [(12 * GIB, 12 * GIB), (20 * GIB, 6 * GIB), (6 * GIB, 20 * GIB)])
def test_multi_gpu_split_fits_every_device_and_maximises_kv(free0: int, free1: int) -> None:
    plan = _two_gpu_plan(free0, free1, precision="bf16")
    first, second = plan.device_split
    assert (first.device, second.device) == ("cuda:0", "cuda:1")
    assert (first.first_layer, first.num_layers + second.num_layers) == (0, SHAPE.num_layers)
    assert second.first_layer == first.num_layers and second.num_layers > 0
    for share in plan.device_split:  # each device holds its own layers' weights, KV and overhead
        used = share.weights_bytes + share.overhead_bytes + share.kv_cache_bytes
        assert used <= share.budget_bytes and share.kv_capacity_tokens == plan.kv_capacity_tokens
    assert first.kv_bytes_per_token + second.kv_bytes_per_token == plan.kv_bytes_per_token
    assert plan.kv_capacity_tokens % 16 == 0 and plan.kv_capacity_tokens > 2048
    # brute force, from the estimate: no split of the layers holds one more block on both devices
    layer = math.ceil(layer_weights_bytes(SHAPE, Precision.BF16, DType.BFLOAT16) / SHAPE.num_layers)
    head = plan.weights_bytes - layer * SHAPE.num_layers
    one_more_block = plan.kv_capacity_tokens + 16 + SCRATCH_TOKENS
    per_layer = layer + plan.kv_bytes_per_token // SHAPE.num_layers * one_more_block
    for k in range(SHAPE.num_layers + 1):
        fits0 = head + first.overhead_bytes + k * per_layer <= first.budget_bytes
        fits1 = second.overhead_bytes + (SHAPE.num_layers - k) * per_layer <= second.budget_bytes
        assert not (fits0 and fits1)
    assert isinstance(plan.device_map, dict) and plan.device_map[""] == 0
    assert [plan.device_map[f"model.layers.{i}"] for i in range(16)] == [0] * first.num_layers + [1] * second.num_layers
    out = plan.to_json()["device_split"]
    assert [d["device"] for d in out] == ["cuda:0", "cuda:1"]
    assert out[0]["layers"] == [0, first.num_layers] and out[1]["layers"] == [first.num_layers, 16]


def test_multi_gpu_kv_is_sized_per_device_not_from_the_sum() -> None:
    plan = _two_gpu_plan(20 * GIB, 6 * GIB, precision="bf16")
    first, second = plan.device_split
    assert first.num_layers > second.num_layers  # the bigger GPU takes more layers
    combined_left = plan.budget_bytes - plan.weights_bytes - plan.quant_state_bytes - plan.overhead_bytes
    assert plan.kv_capacity_tokens <= combined_left // plan.kv_bytes_per_token  # never more than the sum allows
    # the second GPU is the bottleneck: its layers' KV for one more block would not fit beside its weights
    one_more_block = plan.kv_capacity_tokens + 16 + SCRATCH_TOKENS
    more = second.kv_bytes_per_token * one_more_block + second.weights_bytes + second.overhead_bytes
    assert more > second.budget_bytes or first.spare_bytes < first.kv_bytes_per_token * 16


def test_multi_gpu_that_cannot_hold_the_weights_does_not_fit() -> None:
    with pytest.raises(NothingFitsError):
        _two_gpu_plan(2 * GIB, 2 * GIB, precision="bf16")


def test_multi_gpu_without_a_known_layer_list_uses_auto_with_planned_shares() -> None:
    probe = FakeProbe(gpus=[(6 * GIB, 8 * GIB), (3 * GIB, 8 * GIB)])
    plan = make_plan(PlanRequest(model="/fake/model", device="cuda"), probe=probe, shape=SHAPE)
    assert plan.device_map == "auto" and plan.max_memory is not None
    for share in plan.device_split:
        assert plan.max_memory[int(share.device[-1])] >= share.weights_bytes


def _long_context_plan(budget_bytes: int, **kwargs: object) -> Plan:
    """A CPU plan whose minimum holds 32 full sequences of 4096 tokens: the KV cache, not the load, dominates."""
    return plan_for(budget_bytes, max_model_len=4096, min_concurrency=32, max_num_seqs=32, **kwargs)


def test_cpu_ladder_follows_the_numbers_to_torch_int8_and_says_so() -> None:
    """Where bf16's serving need (weights + KV) is over the budget and torch INT8's load peak and serving need are
    not, the CPU ladder takes INT8 on torch's kernel."""
    wide = {c.precision: c for c in _long_context_plan(64 * GIB).candidates}
    bf16, int8 = wide[Precision.BF16], wide[Precision.INT8]
    assert int8.load_peak_bytes < int8.total_bytes < bf16.total_bytes  # serving, not loading, sets both minimums
    plan = _long_context_plan((bf16.total_bytes + int8.total_bytes) // 2)
    assert plan.precision is Precision.INT8 and plan.quant_backend is KernelBackend.TORCH
    assert "torch's weight-only kernel" in plan.reason and plan.quant_state_bytes == 0
    assert plan.to_json()["quant_backend"] == "torch"
    assert [c.backend for c in plan.candidates] == [None, KernelBackend.TORCH, KernelBackend.TORCH]


def test_forced_int4_runs_on_torch_and_says_it_is_not_nf4() -> None:
    plan = plan_for(need(Precision.INT4), precision="int4")
    assert plan.precision is Precision.INT4 and plan.quant_backend is KernelBackend.TORCH
    assert "groupwise asymmetric int4" in plan.reason and "not NF4" in plan.reason


def test_bitsandbytes_backend_on_cpu_keeps_the_nf4_ladder() -> None:
    bnb = KernelBackend.BITSANDBYTES
    plan = plan_for(64 * GIB, quant_backend="bitsandbytes")
    assert [c.precision for c in plan.candidates] == [Precision.BF16, Precision.INT8, Precision.NF4]
    assert [c.backend for c in plan.candidates] == [None, bnb, bnb]
    nf4 = plan_for(need(Precision.NF4, backend=bnb), precision="nf4", quant_backend="bitsandbytes")
    assert nf4.precision is Precision.NF4 and nf4.quant_backend is bnb and "bitsandbytes" in nf4.reason
    int8 = plan_for(need(Precision.INT8, backend=bnb), precision="int8", quant_backend="bitsandbytes")
    assert int8.precision is Precision.INT8 and int8.quant_backend is bnb and int8.quant_state_bytes > 0


def test_old_nf4_spelling_still_loads_bitsandbytes_nf4_on_cpu() -> None:
    plan = plan_for(64 * GIB, precision="nf4")
    assert plan.precision is Precision.NF4 and plan.quant_backend is KernelBackend.BITSANDBYTES


def test_gpu_ladder_stays_on_bitsandbytes() -> None:
    probe = FakeProbe(gpus=[(16 * GIB, 16 * GIB)], bf16=True)
    plan = make_plan(PlanRequest(model="/fake/model"), probe=probe, shape=SHAPE)
    assert [c.precision for c in plan.candidates] == [Precision.BF16, Precision.INT8, Precision.NF4]
    assert [c.backend for c in plan.candidates] == [None, KernelBackend.BITSANDBYTES, KernelBackend.BITSANDBYTES]


@pytest.mark.parametrize("kwargs", [{"precision": "int4"}, {"precision": "int8", "quant_backend": "torch"}])
def test_torch_kernels_are_refused_on_a_gpu(kwargs: dict[str, str]) -> None:
    probe = FakeProbe(gpus=[(16 * GIB, 16 * GIB)], bf16=True)
    with pytest.raises(PlanInputError, match="CPU"):
        make_plan(PlanRequest(model="/fake/model", **kwargs), probe=probe, shape=SHAPE)
