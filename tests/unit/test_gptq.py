"""GPTQ for real: quantize the tiny model with GPTQModel, then plan and load it through fitserve.

Skipped only when the optional extra is absent (`pip install 'fitserve[gptq]'`, with GPTQMODEL_CPU_WORKERS=2
on 2-core machines); CI installs it and runs these.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel", reason="GPTQ tests need the optional extra: pip install 'fitserve[gptq]'")

from fitserve.quant.estimate import inspect_model
from fitserve.quant.load import load_model
from fitserve.quant.plan import PlanInputError, PlanRequest, make_plan
from fitserve.quant.schemes import Precision

CALIBRATION = [f"Sample {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(8)]


@pytest.fixture(scope="module")
def gptq_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama quantized to 4-bit GPTQ (group size 32: its layers are 64 and 128 wide)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import GPTQModel, QuantizeConfig

    out = tmp_path_factory.mktemp("tiny-gptq")
    model = GPTQModel.load(str(tiny_model_dir), QuantizeConfig(bits=4, group_size=32), device="cpu")
    model.quantize(CALIBRATION, batch_size=4)
    model.save(str(out))
    return out


def test_gptq_checkpoint_is_recognised(gptq_model_dir: Path) -> None:
    shape = inspect_model(gptq_model_dir)
    assert shape.prequantized is Precision.GPTQ
    assert shape.gptq is not None and (shape.gptq.bits, shape.gptq.group_size) == (4, 32)
    assert len(shape.linears) == 14


def test_gptq_is_planned_as_it_is(gptq_model_dir: Path) -> None:
    plan = make_plan(PlanRequest(model=gptq_model_dir, memory_budget_bytes=2 << 30, device="cpu"))
    assert plan.precision is Precision.GPTQ and plan.prequantized
    with pytest.raises(PlanInputError):
        make_plan(PlanRequest(model=gptq_model_dir, memory_budget_bytes=2 << 30, device="cpu", precision="nf4"))


def test_gptq_load_matches_prediction(gptq_model_dir: Path) -> None:
    import torch

    plan = make_plan(PlanRequest(model=gptq_model_dir, memory_budget_bytes=2 << 30, device="cpu"))
    loaded = load_model(plan)
    report = loaded.report
    assert abs(report.weights_error_ratio) < 0.03, report.to_log_line()
    assert any(name.endswith("qweight") for name, _ in loaded.model.named_buffers())  # really GPTQ layers
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, len(loaded.tokenizer)) and torch.isfinite(logits).all()
