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


def load(
    default_model_dir: Path,
    precision: str,
    device: str = "cpu",
    double_quant: bool = False,
    quant_backend: str = "auto",
) -> LoadedModel:
    import torch

    torch.set_num_threads(2)
    plan = make_plan(
        PlanRequest(
            model=default_model_dir,
            memory_budget_bytes=4 << 30,
            precision=precision,
            device=device,
            double_quant=double_quant,
            quant_backend=quant_backend,
        )
    )
    assert plan.precision is Precision(precision)
    return load_model(plan)


@pytest.mark.parametrize(
    ("precision", "double_quant", "backend"),
    [
        ("bf16", False, "auto"),
        ("int8", False, "auto"),  # torch weight-only int8 on CPU
        ("int4", False, "auto"),  # torch groupwise int4
        ("int8", False, "bitsandbytes"),
        ("nf4", False, "auto"),
        ("nf4", True, "auto"),
    ],
)
def test_predicted_weights_within_3_percent_on_cpu(
    default_model_dir: Path, precision: str, double_quant: bool, backend: str
) -> None:
    loaded = load(default_model_dir, precision, double_quant=double_quant, quant_backend=backend)
    report = loaded.report
    measured = loaded.model.get_memory_footprint()
    assert report.measured_weights_bytes == measured
    assert abs(report.predicted_weights_bytes - measured) / measured < 0.03, report.to_log_line()
    assert abs(report.predicted_quant_state_bytes - report.measured_quant_state_bytes) <= (
        0.03 * max(report.measured_quant_state_bytes, 1)
    )
    assert report.load_time_s > 0 and report.memory_after.used_bytes > 0
    assert precision in report.to_log_line()


@pytest.mark.parametrize(("precision", "backend"), [("int8", "auto"), ("int8", "bitsandbytes"), ("nf4", "auto")])
def test_quantized_greedy_answer_contains_paris(default_model_dir: Path, precision: str, backend: str) -> None:
    answer = greedy_answer(load(default_model_dir, precision, quant_backend=backend))
    assert "Paris" in answer, answer


def test_torch_weight_only_models_hold_no_dense_copy_of_converted_weights(default_model_dir: Path) -> None:
    import torch

    from fitserve.quant.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    for precision, module_type in (("int8", Int8WeightOnlyLinear), ("int4", Int4WeightOnlyLinear)):
        model = load(default_model_dir, precision).model
        assert sum(isinstance(m, module_type) for m in model.modules()) == 210
        assert not any(type(m) is torch.nn.Linear for n, m in model.named_modules() if n != "lm_head")
        floats = sum(p.numel() for p in model.parameters())  # what is left dense: embedding (= lm_head) and norms
        assert floats == 28_346_688, floats
        del model


# bf16's own first answer token is a near-tie ("The" 25.75 vs "L" 25.5 in bf16 logits); int4 quantization (like any
# perturbation that size) can flip it, after which the free-running answer is a different, French one. So for int4
# the answer is checked the way the issue allows for near-ties: teacher-forced on bf16's greedy answer, int4 must
# pick bf16's token at every position where bf16's top-2 logits are more than NEAR_TIE_LOGITS apart.
NEAR_TIE_LOGITS = 0.5


def test_int4_follows_the_bf16_paris_answer_except_at_near_ties(default_model_dir: Path) -> None:
    import torch

    reference = load(default_model_dir, "bf16")
    answer = greedy_answer(reference)
    assert "Paris" in answer, answer
    tok = reference.tokenizer
    messages = [{"role": "user", "content": QUESTION}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer_ids])
    with torch.inference_mode():
        ref_logits = reference.model(ids).logits[0, len(prompt) - 1 : -1].float()
        int4_logits = load(default_model_dir, "int4").model(ids).logits[0, len(prompt) - 1 : -1].float()
    top2 = ref_logits.topk(2).values
    decisive = (top2[:, 0] - top2[:, 1]) > NEAR_TIE_LOGITS
    agree = int4_logits.argmax(-1) == ref_logits.argmax(-1)
    near_ties = int((~decisive).sum())
    assert bool(agree[decisive].all()), (answer, agree.tolist(), decisive.tolist())
    assert near_ties <= 2, f"{near_ties} near-ties in {len(answer_ids)} tokens"


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
