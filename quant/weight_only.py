"""Weight-only INT8 and INT4 Linears on CPU through PyTorch's own kernels (no calibration, no extra library).

A model is loaded in its 16-bit compute dtype, then every Linear the scheme converts is replaced, one at a time,
by a module that keeps only the quantized weight and its scales (the dense weight is dropped as soon as it is
quantized, so the peak is one dense Linear more than the quantized model):

- `Int8WeightOnlyLinear`: per-output-channel symmetric int8 (`scale = max|w_row| / 127`), run by
  `torch.ops.aten._weight_int8pack_mm` (int8 weight [out, in], scales [out] in the activation dtype) for up to 23
  rows, and as one 16-bit matmul over the weight converted for the call from 24 rows up (prefill, big batches); in
  a compiled decode step of one sequence, by `quant.matvec.matvec_int8`, which inductor fuses into one loop that
  streams the int8 weight (13.1 -> 9.5-9.9 ms a step on the default model).
- `Int4WeightOnlyLinear`: groupwise asymmetric int4 along the input dimension (one scale and one zero per
  `group_size` weights of a row; `w ~ (q - 8) x scale + zero`, q in 0..15; the "tinygemm" layout), packed by
  `torch.ops.aten._convert_weight_to_int4pack_for_cpu` and run by `torch.ops.aten._weight_int4pack_mm_for_cpu`.
  This is not bitsandbytes' NF4 (a 16-value normal-float code book with one absmax per 64 weights).

Both take activations in the dtype their scales are stored in (bf16: measured on this CPU the fp32-activation
paths of both ops are 5-20x slower than bf16, see docs/memory-model.md). Inputs of any leading shape are flattened
to 2-D for the op and reshaped back. Everything resident is a registered buffer, so `get_memory_footprint()`
counts it and the planner predicts it (`quant/schemes.py`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Self

import torch

from fitserve.quant.heap import trim_free_heap
from fitserve.quant.int4_layout import DEFAULT_INT4_GROUP_SIZE, int4_fits
from fitserve.quant.mapped_files import drop_file_pages, mapped_file_ranges
from fitserve.quant.matvec import matvec_int8

INT4_INNER_K_TILES = 1  # the CPU packing's innerKTiles argument (only the CUDA layout uses other values)
INT4_MID = 8  # q - 8 centres the 0..15 codes
# packed int4 rows concatenate exactly (row blocks) only in groups of this many rows: measured on torch 2.13's CPU
# packing, widths of 64k joined bit for bit, 32-row parts did not (tests/unit/test_weight_only.py checks it)
INT4_JOIN_ROW_MULTIPLE = 64
# `_weight_int8pack_mm` costs time in proportion to the rows (one pass over the weight per row): on the default model's
# shapes on the 2-core VM it ties with converting the int8 weight to 16 bits and running one 16-bit matmul at 16 rows,
# and is 1.2-1.4x slower at 24 rows, 2x at 90 (2.2 vs 1.1 ms) and 512 (12.4 vs 5.7 ms: prefill). From this many rows
# the 16-bit matmul runs. Integer codes up to 128 are exact in bf16/fp16, but the product is rounded to 16 bits
# before the scale multiply (the kernel rounds once): perplexity of the default model +3.60% vs bf16 instead of +3.27%
# (benchmarks/perplexity.py; an fp32 matmul that would round once is slower than the kernel here). The converted
# copy is a transient of one Linear (the plan counts the largest).
INT8_DENSE_MATMUL_MIN_ROWS = 24


class WeightOnlyScheme(enum.StrEnum):
    """Which weight-only format to convert Linears to."""

    INT8 = "int8"
    INT4 = "int4"


def weight_only_kernels_available() -> bool:
    """True when this torch build has the CPU weight-only int8/int4 matmul ops."""
    ops = torch.ops.aten
    return all(
        hasattr(ops, name)
        for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], fp32 scales [out]): symmetric per output channel, computed in fp32."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales.unsqueeze(1)).clamp(-128, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 codes 0..15 [out, in], fp32 scales_and_zeros [in / group_size, out, 2]): asymmetric per group."""
    out_features, in_features = weight.shape
    if not int4_fits(out_features, in_features, group_size):
        raise ValueError(f"int4 kernel cannot take a {out_features}x{in_features} weight in groups of {group_size}")
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low = w.amin(dim=2)
    high = w.amax(dim=2)
    scales = ((high - low) / 15.0).clamp(min=1e-12)
    q = torch.round((w - low.unsqueeze(2)) / scales.unsqueeze(2)).clamp(0, 15).to(torch.int32)
    zeros = low + INT4_MID * scales
    scales_and_zeros = torch.stack([scales, zeros], dim=2).transpose(0, 1).contiguous()
    return q.reshape(out_features, in_features), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight [out, in] that int4 codes and their scales/zeros stand for (reference for tests)."""
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, in_features // group_size, group_size)
    scales = scales_and_zeros[..., 0].transpose(0, 1).float().unsqueeze(2)
    zeros = scales_and_zeros[..., 1].transpose(0, 1).float().unsqueeze(2)
    return ((groups - INT4_MID) * scales + zeros).reshape(out_features, in_features)


class _WeightOnlyLinear(torch.nn.Module):
    """Common parts: shapes, optional bias, flattening inputs to the 2-D the ops want."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    @classmethod
    def _joined_shell(cls, parts: Sequence[_WeightOnlyLinear]) -> Self | None:
        """An empty module of this class whose output is the parts' outputs side by side (their biases joined), or
        None when the parts differ in input width, dtype, or in having a bias."""
        first = parts[0]
        if any(
            type(p) is not cls
            or p.in_features != first.in_features
            or p.dtype != first.dtype
            or (p.bias is None) != (first.bias is None)
            for p in parts
        ):
            return None
        biases = [p.bias for p in parts if isinstance(p.bias, torch.Tensor)]
        shell = cls.__new__(cls)
        _WeightOnlyLinear.__init__(
            shell,
            first.in_features,
            sum(p.out_features for p in parts),
            first.dtype,
            torch.cat(biases) if biases else None,
        )
        return shell

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` with the dequantized weight, in `x`'s leading shape and this module's dtype."""
        lead = x.shape[:-1]
        out = self._matmul(x.reshape(-1, self.in_features).to(self.dtype))
        if isinstance(self.bias, torch.Tensor):
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


class Int8WeightOnlyLinear(_WeightOnlyLinear):
    """A Linear with a per-channel symmetric int8 weight, run by `aten._weight_int8pack_mm`."""

    weight_int8: torch.Tensor  # registered buffers
    scales: torch.Tensor

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(linear.in_features, linear.out_features, dtype, linear.bias)
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))

    @classmethod
    def joined(cls, parts: Sequence[Int8WeightOnlyLinear]) -> Int8WeightOnlyLinear | None:
        """One Linear computing the parts' outputs side by side (rows and per-row scales concatenated: exactly
        what quantizing the concatenated dense weight gives), or None when they cannot be joined."""
        shell = cls._joined_shell(parts)
        if shell is not None:
            shell.register_buffer("weight_int8", torch.cat([p.weight_int8 for p in parts]))
            shell.register_buffer("scales", torch.cat([p.scales for p in parts]))
        return shell

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.shape[0] == 1 and torch.compiler.is_compiling():
            return matvec_int8(x2d, self.weight_int8, self.scales)
        if x2d.shape[0] >= INT8_DENSE_MATMUL_MIN_ROWS:  # the same (x @ q.T) x scales, through a 16-bit matmul
            return torch.nn.functional.linear(x2d, self.weight_int8.to(x2d.dtype)) * self.scales
        return torch.ops.aten._weight_int8pack_mm(x2d, self.weight_int8, self.scales)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, {self.dtype}"


class Int4WeightOnlyLinear(_WeightOnlyLinear):
    """A Linear with a groupwise asymmetric int4 weight, run by `aten._weight_int4pack_mm_for_cpu`."""

    weight_int4: torch.Tensor  # registered buffers
    scales_and_zeros: torch.Tensor

    def __init__(
        self, linear: torch.nn.Linear, dtype: torch.dtype = torch.bfloat16, group_size: int = DEFAULT_INT4_GROUP_SIZE
    ) -> None:
        super().__init__(linear.in_features, linear.out_features, dtype, linear.bias)
        self.group_size = group_size
        q, scales_and_zeros = quantize_int4(linear.weight, group_size)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
        self.register_buffer("weight_int4", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(dtype))

    @classmethod
    def joined(cls, parts: Sequence[Int4WeightOnlyLinear]) -> Int4WeightOnlyLinear | None:
        """One Linear computing the parts' outputs side by side, or None when they cannot be joined exactly.

        The packed rows of parts whose widths are multiples of `INT4_JOIN_ROW_MULTIPLE` concatenate into exactly
        what packing the concatenated codes gives (the CPU packing lays such rows out in whole 64-row blocks; other
        widths use a different layout and are left separate); scales and zeros are per row."""
        if any(p.out_features % INT4_JOIN_ROW_MULTIPLE or p.group_size != parts[0].group_size for p in parts):
            return None
        shell = cls._joined_shell(parts)
        if shell is not None:
            shell.group_size = parts[0].group_size
            shell.register_buffer("weight_int4", torch.cat([p.weight_int4 for p in parts]))
            shell.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))
        return shell

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.weight_int4, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int4 asymmetric, "
            f"group {self.group_size}, {self.dtype}"
        )


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_linears` did."""

    converted: int  # Linears replaced
    kept_dense: int  # Linears the rule selected but the scheme cannot convert (shape the int4 kernel does not take)
    released_bytes: int = 0  # checkpoint file pages given back as their Linears were replaced


def quantize_linears(
    model: torch.nn.Module,
    scheme: WeightOnlyScheme,
    should_convert: Callable[[str], bool],
    *,
    dtype: torch.dtype = torch.bfloat16,
    group_size: int = DEFAULT_INT4_GROUP_SIZE,
) -> QuantizeReport:
    """Replace, in place, every plain `nn.Linear` named `n` with `should_convert(n)` by its weight-only form.

    Each dense weight is released as soon as its replacement exists (the caller trims the heap afterwards); a
    weight that views the memory-mapped checkpoint gives its file pages back then too, so the load holds about one
    Linear of the checkpoint at a time instead of every page it has read (quant/mapped_files.py).
    """
    targets = [
        name for name, module in model.named_modules() if type(module) is torch.nn.Linear and should_convert(name)
    ]
    ranges = mapped_file_ranges()
    converted = kept = released = 0
    with torch.no_grad():
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            if scheme is WeightOnlyScheme.INT4 and not int4_fits(linear.out_features, linear.in_features, group_size):
                kept += 1
                continue
            if scheme is WeightOnlyScheme.INT8:
                replacement: torch.nn.Module = Int8WeightOnlyLinear(linear, dtype)
            else:
                replacement = Int4WeightOnlyLinear(linear, dtype, group_size)
            address, nbytes = linear.weight.data_ptr(), linear.weight.nbytes
            setattr(parent, child, replacement)
            del linear
            released += drop_file_pages(address, nbytes, ranges)
            trim_free_heap()  # the quantizer's temporaries, freed below the buffers just kept (quant/heap.py)
            converted += 1
    return QuantizeReport(converted, kept, released)
