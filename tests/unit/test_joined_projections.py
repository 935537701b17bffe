"""Joined q/k/v and gate/up projections (server/engine/joined_projections.py): bit-identical to the separate parts
for every kind the engine joins, left separate where joining would not be exact, and `model(...)` unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fitserve.quant.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from fitserve.server.engine.cpu_linear import PackedLinear
from fitserve.server.engine.joined_projections import (
    GATE_UP_NAME,
    QKV_NAME,
    OutputSlice,
    join_linears,
    join_llama_projections,
)

WIDTHS = (576, 192, 192)  # the default model's q/k/v


def linears(widths: tuple[int, ...], dtype: torch.dtype, bias: bool = False) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(576, width, bias=bias, dtype=dtype) for width in widths]


def side_by_side(modules: list[torch.nn.Module], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([module(x) for module in modules], dim=-1)


KINDS: dict[str, tuple[torch.dtype, Callable[[torch.nn.Linear], torch.nn.Module]]] = {
    "fp32": (torch.float32, lambda linear: linear),
    "bf16": (torch.bfloat16, lambda linear: linear),
    "int8": (torch.bfloat16, Int8WeightOnlyLinear),
    "int4": (torch.bfloat16, Int4WeightOnlyLinear),
}


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_joined_module_equals_its_parts_bit_for_bit(kind: str, rows: int) -> None:
    dtype, convert = KINDS[kind]
    parts = [convert(linear) for linear in linears(WIDTHS, dtype, bias=kind != "int4")]
    joined = join_linears(parts)
    assert joined is not None and type(joined) is type(parts[0])
    x = torch.randn(1, rows, 576, dtype=dtype)
    assert torch.equal(joined(x), side_by_side(parts, x))


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_joining_quantized_parts_is_quantizing_the_joined_weight(kind: str) -> None:
    dtype, convert = KINDS[kind]
    parts = linears(WIDTHS, dtype)
    dense = torch.nn.Linear(576, sum(WIDTHS), bias=False, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(torch.cat([p.weight for p in parts]))
    joined, whole = join_linears([convert(p) for p in parts]), convert(dense)
    assert joined is not None
    for name, buffer in whole.named_buffers():
        assert torch.equal(buffer, getattr(joined, name)), name


def test_packing_the_joined_linear_equals_packing_each_part() -> None:
    parts = linears(WIDTHS, torch.float32)
    joined = join_linears(parts)
    assert isinstance(joined, torch.nn.Linear)
    x = torch.randn(1, 5, 576)
    assert torch.equal(PackedLinear(joined)(x), side_by_side([PackedLinear(p) for p in parts], x))


def test_parts_that_cannot_be_joined_exactly_stay_separate() -> None:
    # int4 rows outside whole 64-row blocks pack in another layout: their packed bytes do not concatenate
    assert join_linears([Int4WeightOnlyLinear(p) for p in linears((64, 32, 32), torch.bfloat16)]) is None
    mixed = linears((64, 64), torch.bfloat16)
    assert join_linears([Int8WeightOnlyLinear(mixed[0]), mixed[1]]) is None  # different kinds
    assert join_linears([*linears((64,), torch.float32), *linears((64,), torch.bfloat16)]) is None  # dtypes
    assert join_linears([*linears((64,), torch.float32), *linears((64,), torch.float32, bias=True)]) is None


def test_a_joined_model_gives_the_same_logits_through_model_call(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        parameters = sum(p.numel() for p in model.parameters())
        report = join_llama_projections(model)
        after = model(input_ids=ids).logits
    layers = model.model.layers
    assert report.joined == 2 * len(layers) and report.kept == 0
    assert all(isinstance(layer.self_attn.q_proj, OutputSlice) and hasattr(layer.mlp, GATE_UP_NAME) for layer in layers)
    assert sum(p.numel() for p in model.parameters()) == parameters  # same weights, no copy left behind
    assert torch.equal(before, after)
    again = join_llama_projections(model)  # idempotent
    assert again.joined == 0 and all(hasattr(layer.self_attn, QKV_NAME) for layer in layers)


def test_the_slices_follow_the_joined_module_when_packing_replaces_it(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from fitserve.server.engine.cpu_linear import prepack_linears

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(100, 40000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        join_llama_projections(model)
        prepack_linears(model)
        after = model(input_ids=ids).logits
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, PackedLinear)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # oneDNN rounds unlike sgemm in the last bits
