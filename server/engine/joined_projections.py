"""Llama's q/k/v projections and its MLP's gate/up projections joined into one matmul each, for the direct loop.

Each decoder layer of a Llama model multiplies the same input by three attention projections and, later, by two MLP
projections. Joined along their output features (vLLM's QKV and merged gate/up layers), a layer runs four matmuls
instead of seven: fewer kernel calls and fewer passes over the activations, and wider matrices the CPU kernels run
closer to memory bandwidth. Measured on the 2-core VM over the default model's 30 layers at one row: q/k/v and
gate/up 9.1 -> 7.0 ms in bf16 (oneDNN prepacked), 10.0 -> 8.6 ms in INT8 and 4.8 -> 3.2 ms in INT4 (torch's
weight-only kernels); docs/benchmarks.md has the decode step.

Joining is exact: every output column is the same dot product over the same input, so the joined module's outputs
equal the separate ones bit for bit for plain and oneDNN-packed Linears and for torch's INT8/INT4 weight-only
Linears (quantized per row, or per row and input group: joining after quantizing gives what quantizing the joined
weight would). Kinds that cannot be joined exactly (bitsandbytes, GPTQ, INT4 widths outside whole 64-row blocks)
stay separate, and the direct loop calls them as before.

The joined module takes the first part's place in the layer (`qkv_proj` on the attention module, `gate_up_proj` on
the MLP); each original attribute becomes an `OutputSlice` of it, so `model(...)` keeps working (slower: the joined
matmul runs once per slice) and gives the same numbers. Each dense original that viewed the memory-mapped
checkpoint gives its file pages back as soon as the joined copy exists, as packing does (quant/mapped_files.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fitserve.quant.mapped_files import drop_file_pages, mapped_file_ranges
from fitserve.quant.weight_only import Int4WeightOnlyLinear, Int8WeightOnlyLinear

QKV_PARTS = ("q_proj", "k_proj", "v_proj")
GATE_UP_PARTS = ("gate_proj", "up_proj")
QKV_NAME = "qkv_proj"
GATE_UP_NAME = "gate_up_proj"


class OutputSlice(torch.nn.Module):
    """Stands in for one joined part: columns [start, stop) of the joined module's output (what the part gave)."""

    def __init__(self, owner: torch.nn.Module, joined_name: str, start: int, stop: int) -> None:
        super().__init__()
        self._owner = [owner]  # in a list: the owner already registers the joined module; this only points at it
        self.joined_name = joined_name
        self.start, self.stop = start, stop
        self.out_features = stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The part's output, computed through the joined module (the module currently there: packing or
        quantizing it later replaces it, and the slice follows)."""
        joined = getattr(self._owner[0], self.joined_name)
        return joined(x)[..., self.start : self.stop].contiguous()

    def extra_repr(self) -> str:
        return f"{self.joined_name}[..., {self.start}:{self.stop}]"


def join_linears(parts: Sequence[torch.nn.Module]) -> torch.nn.Module | None:
    """One module whose output is the parts' outputs side by side, or None when they cannot be joined exactly."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts):
        return None
    if kind is Int8WeightOnlyLinear:
        return Int8WeightOnlyLinear.joined(parts)  # type: ignore[arg-type]
    if kind is Int4WeightOnlyLinear:
        return Int4WeightOnlyLinear.joined(parts)  # type: ignore[arg-type]
    if kind is not torch.nn.Linear:
        return None
    linears: list[torch.nn.Linear] = list(parts)  # type: ignore[arg-type]
    first = linears[0]
    if any(
        p.in_features != first.in_features
        or p.weight.dtype != first.weight.dtype
        or p.weight.device != first.weight.device
        or (p.bias is None) != (first.bias is None)
        for p in linears
    ):
        return None
    out_features = sum(p.out_features for p in linears)
    joined = torch.nn.Linear(
        first.in_features, out_features, bias=first.bias is not None, device="meta", dtype=first.weight.dtype
    )
    with torch.no_grad():
        joined.weight = torch.nn.Parameter(torch.cat([p.weight for p in linears]), requires_grad=False)
        if first.bias is not None:
            joined.bias = torch.nn.Parameter(torch.cat([p.bias for p in linears]), requires_grad=False)
    return joined


@dataclass(frozen=True)
class JoinReport:
    """What `join_llama_projections` did."""

    joined: int  # groups joined (q/k/v or gate/up of one layer)
    kept: int  # groups left separate: kinds or widths that cannot be joined exactly
    released_bytes: int  # checkpoint file pages of dense originals given back


def join_llama_projections(model: torch.nn.Module) -> JoinReport:
    """Join every decoder layer's q/k/v and gate/up projections in place (idempotent: joined layers are skipped).

    `model` is a transformers Llama model (`supports_direct_forward` checked it); parts are released one group at a
    time, so the peak is one group's joined copy more than the model."""
    ranges = mapped_file_ranges()
    joined = kept = released = 0
    for layer in model.model.layers:  # type: ignore[union-attr]
        groups = ((layer.self_attn, QKV_PARTS, QKV_NAME), (layer.mlp, GATE_UP_PARTS, GATE_UP_NAME))
        for owner, names, joined_name in groups:
            if hasattr(owner, joined_name):
                continue
            parts = [getattr(owner, name) for name in names]
            module = join_linears(parts)
            if module is None:
                kept += 1
                continue
            dense = [(p.weight.data_ptr(), p.weight.nbytes) for p in parts if type(p) is torch.nn.Linear]
            setattr(owner, joined_name, module)
            start = 0
            for name, part in zip(names, parts, strict=True):
                setattr(owner, name, OutputSlice(owner, joined_name, start, start + part.out_features))
                start += part.out_features
            del parts
            released += sum(drop_file_pages(address, nbytes, ranges) for address, nbytes in dense)
            joined += 1
    return JoinReport(joined, kept, released)
