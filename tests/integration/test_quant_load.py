"""The default model loaded for real in each precision: the plan's weight bytes vs get_memory_footprint(), and
greedy answers that still know the capital of France."""

from __future__ import annotations

from pathlib import Path

import pytest

from fitserve.quant.load import LoadedModel, load_model
from fitserve.quant.plan import PlanRequest, make_plan
from fitserve.quant.schemes import Precision

pytestmark = pytest.mark.integration

QUESTION = "What is the capital of France?"


def greedy_answer(loaded: LoadedModel, max_new_tokens: int = 24) -> str:
    import torch

    tok = loaded.tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(loaded.model.device)
    with torch.inference_mode():
        out = loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def load(default_model_dir: Path, precision: str, device: str = "cpu", double_quant: bool = False) -> LoadedModel:
    import torch

    torch.set_num_threads(2)
    plan = make_plan(
        PlanRequest(
            model=default_model_dir,
            memory_budget_bytes=4 << 30,
            precision=precision,
            device=device,
            double_quant=double_quant,
        )
    )
    assert plan.precision is Precision(precision)
    return load_model(plan)


@pytest.mark.parametrize(
    ("precision", "double_quant"), [("bf16", False), ("int8", False), ("nf4", False), ("nf4", True)]
)
def test_predicted_weights_within_3_percent_on_cpu(default_model_dir: Path, precision: str, double_quant: bool) -> None:
    loaded = load(default_model_dir, precision, double_quant=double_quant)
    report = loaded.report
    measured = loaded.model.get_memory_footprint()
    assert report.measured_weights_bytes == measured
    assert abs(report.predicted_weights_bytes - measured) / measured < 0.03, report.to_log_line()
    assert abs(report.predicted_quant_state_bytes - report.measured_quant_state_bytes) <= (
        0.03 * max(report.measured_quant_state_bytes, 1)
    )
    assert report.load_time_s > 0 and report.memory_after.used_bytes > 0
    assert precision in report.to_log_line()


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_quantized_greedy_answer_contains_paris(default_model_dir: Path, precision: str) -> None:
    answer = greedy_answer(load(default_model_dir, precision))
    assert "Paris" in answer, answer


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "int8", "nf4"])
def test_predicted_weights_within_3_percent_on_cuda(default_model_dir: Path, precision: str) -> None:
    loaded = load(default_model_dir, precision, device="cuda:0")
    report = loaded.report
    assert abs(report.weights_error_ratio) < 0.03, report.to_log_line()
    assert report.memory_after.torch_allocated_bytes is not None
    assert report.memory_after.torch_allocated_bytes >= report.measured_weights_bytes * 0.97
    if precision != "bf16":
        assert "Paris" in greedy_answer(loaded)


@pytest.mark.gpu
def test_cuda_budget_matches_mem_get_info() -> None:
    import torch

    from fitserve.quant.budget import detect_budget, reserve_bytes

    free, total = torch.cuda.mem_get_info(0)  # first: this creates our CUDA context, which NVML then sees too
    budget = detect_budget("cuda:0")
    (dev,) = budget.devices
    assert abs(dev.total_bytes - total) <= 64 << 20  # NVML v2 total less driver-reserved == cudaMemGetInfo total
    assert abs(dev.free_bytes - free) < 256 << 20  # other processes may move a little in between
    assert dev.budget_bytes == max(dev.free_bytes - reserve_bytes(total), 0)
