"""Matrix-vector products for compiled one-row steps: `x @ W.T` written so that inductor streams the weight.

A decode step of one sequence multiplies one row by every weight matrix once. Written as a multiply-and-sum over the
row-major weight, torch.compile (inductor) turns each product into one fused, vectorised reduction that reads the
weight at close to memory bandwidth (bf16 on the 2-core AVX512-BF16 VM: 20-35 GB/s, where oneDNN's kernels reach
11-19 GB/s). In eager mode the same code is slow (it materialises the upcast weight): only call it while compiling.

The input row is realised into a buffer first (inductor's `prims.inductor_force_stride_order`, whose lowering
requires a realised input and which costs nothing at run time): left to itself inductor inlines the ops that produce
the row (an RMSNorm, the SiLU gate) into the reduction's loop and recomputes them for every output feature (a bf16
3072 x 576 product after an RMSNorm: 162 us inlined, 121 us realised; an opaque Python custom op as the barrier gave
134 us and cost ~13 us of dispatch per call, 121 calls a step).

`matvec_int8` is the same reduction over torch's per-row int8 weights (`(q.float() * x).sum(-1) * scales`): over a
98304 x 576 weight on the 2-core VM it reads 33 G weights/s where `_weight_int8pack_mm` reads 17.7 (one thread: 17
and 8.4), and the default model's compiled INT8 step fell from 13.1 to 9.5-9.9 ms with it (`benchmarks/decode_step.py
--compile-modes off,inductor --precision int8 --batch-sizes 1`). An earlier trial had found it slower in the step
(25-32 vs 23.9 ms): that benchmark then loaded its models on its main thread, which halves every compiled step (see
docs/benchmarks.md, 2026-12-05), and was not comparing like with like.
"""

from __future__ import annotations

import torch


def realized_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, computed into its own buffer before a reduction reads it (inductor's stride-forcing prim realises
    its input), so that inductor does not recompute `x`'s producers inside the reduction's loop. A torch without the
    prim fails the build, which the runner reports (and AUTO then serves eagerly) rather than compiling a slower step
    silently. For compiled graphs only (eagerly it is a copy)."""
    import torch._inductor.inductor_prims  # registers prims.inductor_force_stride_order (imported here: ~1 s)

    out = x.float().contiguous()
    return torch.ops.prims.inductor_force_stride_order(out, out.stride())


def _row(x: torch.Tensor) -> torch.Tensor:
    """`x` as one realised fp32 row."""
    return realized_fp32(x.reshape(1, x.shape[-1]))


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ W.T + b` for an `x` of one row over a dense `weight` [out, in], accumulated in fp32, in `x`'s dtype."""
    out = (weight.float() * _row(x)).sum(dim=-1).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


def matvec_int8(x: torch.Tensor, weight_int8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x @ (W_int8 x scales).T` for an `x` of one row over a per-output-channel int8 weight [out, in]: the products
    accumulated in fp32, scaled, then rounded once to `x`'s dtype (as `aten._weight_int8pack_mm` rounds)."""
    out = ((weight_int8.float() * _row(x)).sum(dim=-1) * scales.float()).to(x.dtype)
    return out.reshape(*x.shape[:-1], weight_int8.shape[0])
