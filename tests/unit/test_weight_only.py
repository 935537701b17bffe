"""torch weight-only INT8/INT4 Linears: accuracy against the dense layer, what stays resident, model conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.quant.estimate import build_shape, linear_conversion_rule, weights_bytes
from fitserve.quant.matvec import matvec_int8
from fitserve.quant.schemes import DType, KernelBackend, Precision
from fitserve.quant.weight_only import (
    INT8_DENSE_MATMUL_MIN_ROWS,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    WeightOnlyScheme,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_linears,
    weight_only_kernels_available,
)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def make_linear(out_features: int = 96, in_features: int = 128, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    torch.nn.init.normal_(linear.weight, std=0.02)  # like a trained LLM weight, not uniform
    return linear


def test_kernels_exist_in_this_torch() -> None:
    assert weight_only_kernels_available()


def test_int8_quantization_is_symmetric_per_row() -> None:
    weight = make_linear().weight
    q, scales = quantize_int8(weight)
    assert q.dtype is torch.int8 and scales.shape == (96,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((96,), 127, dtype=torch.int8))  # each row's max hits 127
    assert relative_error(q.float() * scales.unsqueeze(1), weight) < 0.01


def test_int4_quantization_round_trips_within_half_a_step() -> None:
    weight = make_linear().weight
    q, scales_and_zeros = quantize_int4(weight, 32)
    assert q.min() >= 0 and q.max() <= 15 and scales_and_zeros.shape == (128 // 32, 96, 2)
    step = scales_and_zeros[..., 0].transpose(0, 1).repeat_interleave(32, dim=1)
    assert ((dequantize_int4(q, scales_and_zeros, 32) - weight).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("rows", [5, INT8_DENSE_MATMUL_MIN_ROWS + 3], ids=["kernel", "16-bit matmul"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_the_dense_layer(dtype: torch.dtype, bias: bool, rows: int) -> None:
    """Below INT8_DENSE_MATMUL_MIN_ROWS rows `_weight_int8pack_mm` runs, from there a 16-bit matmul: both compute
    the same product."""
    linear = make_linear(bias=bias)
    x = torch.randn(2, rows, 128)
    module = Int8WeightOnlyLinear(linear, dtype)
    out = module(x)
    assert out.shape == (2, rows, 96) and out.dtype is dtype
    assert relative_error(out, linear(x)) < 0.02
    # exactly the op on the dequantized weight (up to the activation dtype's rounding)
    q, scales = quantize_int8(linear.weight)
    ref = torch.nn.functional.linear(x.to(dtype).float(), q.float() * scales.unsqueeze(1), linear.bias)
    assert relative_error(out, ref) < (0.01 if dtype is torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(("rows", "streams_int8"), [(1, True), (5, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_int8_linear_streams_its_int8_weight_for_one_row(rows: int, streams_int8: bool, bias: bool) -> None:
    """Traced by torch.compile, a one-row input is computed by `matvec_int8` (a multiply-and-sum over the int8 weight
    that inductor fuses into one streaming loop) and more rows by `_weight_int8pack_mm`; both give what the eager
    module (the kernel) gives, within bf16 rounding."""
    module = Int8WeightOnlyLinear(make_linear(bias=bias), torch.bfloat16)
    x = torch.randn(1, rows, 128)
    targets: list[str] = []

    def capture(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op in ("call_function", "call_method"))
        return gm

    torch._dynamo.reset()
    with torch.inference_mode():
        expected = module(x)
        got = torch.compile(module, backend=capture, fullgraph=True)(x)
    assert got.shape == expected.shape == (1, rows, 96) and got.dtype is torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-3)
    assert any("_weight_int8pack_mm" in target for target in targets) is not streams_int8
    assert any("sum" in target for target in targets) is streams_int8


def test_matvec_int8_rounds_once_like_the_kernel() -> None:
    """fp32 products and sum, times the scale, one rounding to bf16: within a bf16 step of the exact result."""
    linear = make_linear(out_features=200, in_features=576)
    q, scales = quantize_int8(linear.weight)
    x = torch.randn(1, 576).to(torch.bfloat16)
    got = matvec_int8(x, q, scales.to(torch.bfloat16))
    exact = (x.double() @ q.double().T) * scales.to(torch.bfloat16).double()
    assert got.shape == (1, 200) and got.dtype is torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_linear_matches_its_dequantized_weight(group_size: int, dtype: torch.dtype) -> None:
    linear = make_linear(bias=True)
    x = torch.randn(3, 128)
    module = Int4WeightOnlyLinear(linear, dtype, group_size)
    out = module(x)
    q, scales_and_zeros = quantize_int4(linear.weight, group_size)
    ref = torch.nn.functional.linear(x.to(dtype).float(), dequantize_int4(q, scales_and_zeros, group_size), linear.bias)
    assert out.shape == (3, 96) and out.dtype is dtype
    assert relative_error(out, ref) < (0.01 if dtype is torch.bfloat16 else 1e-5)
    assert relative_error(out, linear(x)) < 0.15  # 4 bits: ~6% on normal weights


def test_only_the_packed_weight_and_scales_stay_resident() -> None:
    linear = make_linear(out_features=64, in_features=128)
    int8 = Int8WeightOnlyLinear(linear, torch.bfloat16)
    assert not list(int8.parameters())
    assert {n: (b.dtype, tuple(b.shape)) for n, b in int8.named_buffers()} == {
        "weight_int8": (torch.int8, (64, 128)),
        "scales": (torch.bfloat16, (64,)),
    }
    int4 = Int4WeightOnlyLinear(linear, torch.bfloat16, 32)
    assert not list(int4.parameters())
    sizes = {n: b.numel() * b.element_size() for n, b in int4.named_buffers()}
    assert sizes == {"weight_int4": 64 * 128 // 2, "scales_and_zeros": 4 * 64 * 2 * 2}


def load_tiny(tiny_model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()


@pytest.mark.parametrize(
    ("scheme", "precision", "module_type"),
    [
        (WeightOnlyScheme.INT8, Precision.INT8, Int8WeightOnlyLinear),
        (WeightOnlyScheme.INT4, Precision.INT4, Int4WeightOnlyLinear),
    ],
)
def test_converted_tiny_llama_matches_the_estimate_and_the_dense_model(
    tiny_model_dir: Path, scheme: WeightOnlyScheme, precision: Precision, module_type: type
) -> None:
    dense = load_tiny(tiny_model_dir)
    model = load_tiny(tiny_model_dir)
    report = quantize_linears(model, scheme, linear_conversion_rule(model))
    assert report.converted == 14 and report.kept_dense == 0  # 2 layers x q/k/v/o/gate/up/down
    assert type(model.lm_head) is torch.nn.Linear  # the tied output embedding stays dense
    assert sum(isinstance(m, module_type) for m in model.modules()) == 14
    predicted, side = weights_bytes(build_shape(tiny_model_dir), precision, DType.BFLOAT16, backend=KernelBackend.TORCH)
    assert side == 0 and predicted == model.get_memory_footprint()
    ids = torch.tensor([[1, 20, 300, 4000, 50, 6]])
    with torch.inference_mode():
        out, ref = model(ids).logits, dense(ids).logits
    assert relative_error(out, ref) < (0.05 if precision is Precision.INT8 else 0.3)
