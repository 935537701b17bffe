"""fp32 and bf16 Linears on CPU with their weights prepacked once for oneDNN (the engine's CPU matmul path).

`F.linear` on CPU calls MKL's sgemm, which for the few rows of a decode step (1-64 tokens) is far from the
memory-bandwidth limit: with the default model's shapes on 2 AVX2 cores, every layer's Linears take 63 ms at 4 and
16 rows (`benchmarks/cpu_matmul_dtypes.py` has the plain side). oneDNN with the weight reordered once into its
blocked layout (what IPEX and torch.compile's CPU freezing do) takes 34 ms at 4 rows and 55 ms at 16, and the
49152-row lm_head 10 ms instead of 22 ms at 16 rows; long prefill chunks (512 rows) run at the same speed either
way. Results differ from sgemm's in the last bits (about 1e-6), like sgemm's own results at different row counts.

bf16 gains as much where the CPU computes bf16 natively (oneDNN's `_is_mkldnn_bf16_supported`, AVX512-BF16/AMX):
on the default model's shapes on the 2-core AVX512-BF16 VM, every layer's Linears plus the lm_head took 35 ms
through `F.linear` and 24 ms prepacked at 1 row, 45 ms and 25 ms at 16 rows, with bit-identical results (bf16's
`F.linear` goes to oneDNN too, without the blocked layout). `docs/benchmarks.md` has the numbers.

Only plain `torch.nn.Linear` modules in fp32 (or bf16, where native) on CPU are converted (bitsandbytes' INT8/NF4
Linears, torch's weight-only INT8/INT4 Linears and fp16 keep their own kernels). A packed weight replaces the
original, so memory stays the same, except for a weight shared with another module (tied embeddings: the embedding
lookup still needs the dense table), which is packed only when the caller's memory allowance covers the extra copy
(`fitserve serve`: the budget the plan leaves over).

A bf16 model served in its checkpoint's dtype views the memory-mapped file: a packed copy would leave the file
pages it was made from resident beside it and double the weights' memory (measured: the budget test's bf16 server
peaked at 933 MiB against a 757 MiB budget). Each packed original's file pages are therefore given back as soon as
its copy exists (`quant/mapped_files.py`), so packing holds one Linear's copy more at most.

A compiled decode step of one sequence reads each weight once for one row: a matrix-vector product, which oneDNN's
kernels (packed or not) run at 11-19 GB/s on the 2-core AVX512-BF16 VM, against 35 GB/s the memory reads. As
`quant.matvec.matvec` over the dense row-major weight, inductor streams the weight at 20-35 GB/s (bf16 lm_head 1.6 ms
instead of 3.9 ms; a decode step of the default model 22.9 -> 13.9 ms in bf16 and 32.3 -> 18.7 ms in fp32,
`benchmarks/decode_step.py`). It needs the dense weight, which
packing replaces, so `prepack_linears` can keep each dense weight beside its packed copy (`keep_dense`): the packed
copies are then all extra memory, which `fitserve serve` only spends when the plan's spare budget holds it
(server/engine/compile_mode.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from fitserve.quant.mapped_files import drop_file_pages, mapped_file_ranges
from fitserve.quant.matvec import matvec
from fitserve.quant.schemes import KernelBackend, Precision
from fitserve.server.engine.compile_mode import CpuLinearKernels


@torch.library.custom_op("fitserve::onednn_linear", mutates_args=())
def onednn_linear(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """`x @ W.T + b` with W prepacked by `mkldnn._reorder_linear_weight`; an opaque op to torch.compile (inductor's
    own lowering of `_linear_pointwise` only accepts weights it froze itself)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


@onednn_linear.register_fake
def _onednn_linear_shape(
    x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def onednn_linear_available() -> bool:
    """True when this torch build has oneDNN (mkldnn) with the prepacked-linear ops."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedLinear(torch.nn.Module):
    """A Linear whose weight lives in oneDNN's blocked layout; same inputs and outputs as the `nn.Linear`.

    With `keep_dense`, the dense weight stays too (`dense_weight`), and a compiled graph computes one-row inputs
    with `matvec` over it instead of oneDNN."""

    def __init__(self, linear: torch.nn.Linear, keep_dense: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            # plain attributes, not Parameters: `.to()`, state_dict and parameter walks leave them alone
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
            self.dense_weight = linear.weight.detach() if keep_dense else None
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b` through oneDNN (the custom op when compiled, the aten op directly in eager mode), or, in a
        compiled graph with one row and the dense weight kept, `matvec`."""
        if torch.compiler.is_compiling():
            if self.dense_weight is not None and x.numel() == self.in_features:
                return matvec(x, self.dense_weight, self.bias)
            return onednn_linear(x, self.packed_weight, self.bias, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        dense = ", dense kept" if self.dense_weight is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"oneDNN{dense}"
        )


def packable_dtypes() -> frozenset[torch.dtype]:
    """The weight dtypes oneDNN runs faster prepacked on this CPU: fp32 always, bf16 where the CPU has it natively
    (elsewhere oneDNN emulates bf16 and the plan would not pick it)."""
    if not onednn_linear_available():
        return frozenset()
    native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return frozenset({torch.float32, torch.bfloat16} if native_bf16 else {torch.float32})


def cpu_linear_kernels(precision: Precision, quant_backend: KernelBackend | None) -> CpuLinearKernels:
    """What runs the Linears of a CPU plan in `precision` on this machine, for AUTO's compile choice."""
    if quant_backend is KernelBackend.TORCH:
        return CpuLinearKernels.WEIGHT_ONLY
    dtype = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16}.get(precision)
    if dtype is not None and dtype in packable_dtypes():
        return CpuLinearKernels.DENSE_PACKED
    return CpuLinearKernels.OTHER


@dataclass(frozen=True)
class PackReport:
    """What `prepack_linears` did."""

    packed: int  # Linears converted
    skipped: int  # Linears left alone: their copy did not fit the allowance (a shared weight, or keep_dense)
    extra_bytes: int  # bytes of packed copies whose originals stay (shared weights; every one with keep_dense)
    released_bytes: int = 0  # file pages of packed originals that viewed the mapped checkpoint, given back


def prepack_linears(model: torch.nn.Module, shared_copy_bytes: int = 0, keep_dense: bool = False) -> PackReport:
    """Replace every CPU `nn.Linear` of a `packable_dtypes()` dtype in `model` by a `PackedLinear`, in place.

    A Linear whose weight tensor is shared with another module (tied embeddings) is packed only while the
    copies fit in `shared_copy_bytes`: the original stays for the other user, so its packed copy is extra memory.
    With `keep_dense` every original stays (for `matvec` in compiled one-row steps), so every packed copy is extra
    memory and counts against `shared_copy_bytes`; Linears beyond it stay dense `nn.Linear`s. A packed shared
    Linear always keeps its original for `matvec` (it stays in memory for the other user anyway).
    """
    dtypes = packable_dtypes()
    if not dtypes:
        return PackReport(0, 0, 0)
    mapped = mapped_file_ranges()
    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    targets = [  # names only: holding the modules would keep every unpacked weight alive until the end
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and module.weight.dtype in dtypes and module.weight.device.type == "cpu"
    ]
    packed = skipped = extra = released = 0
    for name in targets:  # each original Linear is freed as soon as its packed copy replaces it
        module = model.get_submodule(name)
        if not isinstance(module, torch.nn.Linear):  # cannot happen: listed above as a Linear
            continue
        shared = uses[module.weight.data_ptr()] > 1
        copy_bytes = module.weight.numel() * module.weight.element_size() if shared or keep_dense else 0
        if extra + copy_bytes > shared_copy_bytes:
            skipped += 1
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module, keep_dense=keep_dense or shared))  # a shared one stays anyway
        packed += 1
        extra += copy_bytes
        if not shared and not keep_dense:  # nothing else uses the original: its file pages can go
            released += drop_file_pages(module.weight.data_ptr(), module.weight.nbytes, mapped)
    return PackReport(packed, skipped, extra, released)
