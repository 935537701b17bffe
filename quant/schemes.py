"""Precisions and one small handler per scheme: bytes per converted weight, side tensors, load kwargs.

Each handler answers three questions with no torch at import time:
- how many bytes a converted Linear weight of `numel` elements takes inside `get_memory_footprint()`
  (parameters and buffers),
- how many bytes of side tensors the scheme keeps *outside* parameters and buffers (bitsandbytes' per-row
  INT8 scales, NF4 per-block absmax), which are real memory but invisible to `get_memory_footprint()`,
- which keyword arguments `from_pretrained` needs to load the model that way,
and, for the schemes fitserve quantizes itself (torch's weight-only CPU kernels, `quant/weight_only.py`), converts
the loaded 16-bit model.

A quantized precision's kernel backend is a detail of its handler (`backend_for`): on CPU, INT8 runs through
torch's `_weight_int8pack_mm` and the 4-bit rung is INT4 through `_weight_int4pack_mm_for_cpu`; on CUDA, INT8 is
bitsandbytes' LLM.int8 and the 4-bit rung NF4. `--quant-backend bitsandbytes` keeps bitsandbytes on CPU too.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fitserve.quant.int4_layout import DEFAULT_INT4_GROUP_SIZE, int4_fits


class Precision(enum.StrEnum):
    """How the model's weights are stored once loaded."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"  # int8 weights: torch per-channel weight-only on CPU, bitsandbytes LLM.int8 on CUDA
    INT4 = "int4"  # torch groupwise asymmetric int4 (CPU only; not NF4)
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    GPTQ = "gptq"  # a pre-quantized GPTQ checkpoint, loaded as it is

    @property
    def is_quantized(self) -> bool:
        """True for schemes that convert Linear weights to fewer than 16 bits."""
        return self in (Precision.INT8, Precision.INT4, Precision.NF4, Precision.GPTQ)


class KernelBackend(enum.StrEnum):
    """The library whose kernels run a quantized precision's matmuls."""

    TORCH = "torch"  # torch's weight-only CPU ops (quant/weight_only.py): INT8, INT4
    BITSANDBYTES = "bitsandbytes"  # LLM.int8 and NF4 (CUDA; on CPU only when asked, slow there)


def backend_for(precision: Precision, *, on_cuda: bool, requested: KernelBackend | None = None) -> KernelBackend | None:
    """The kernel backend a precision runs on: None for dense and GPTQ, bitsandbytes for NF4, torch for INT4;
    INT8 follows `requested`, else torch on CPU and bitsandbytes on CUDA. Raises ValueError for a combination
    fitserve does not run (torch's weight-only kernels on CUDA)."""
    if precision is Precision.NF4:
        return KernelBackend.BITSANDBYTES
    if precision is Precision.INT4:
        if on_cuda:
            raise ValueError("int4 runs on torch's CPU kernel only; on a GPU use nf4 (bitsandbytes)")
        return KernelBackend.TORCH
    if precision is not Precision.INT8:
        return None
    backend = requested or (KernelBackend.BITSANDBYTES if on_cuda else KernelBackend.TORCH)
    if on_cuda and backend is KernelBackend.TORCH:
        raise ValueError("the torch weight-only int8 kernel is used on CPU only; on a GPU int8 is bitsandbytes")
    return backend


def kernel_note(precision: Precision, backend: KernelBackend | None) -> str | None:
    """One phrase for the plan's reason: which kernels and which format a quantized precision runs on."""
    if backend is KernelBackend.TORCH and precision is Precision.INT8:
        return "int8 on torch's weight-only kernel (per-channel symmetric int8 weights, 16-bit activations)"
    if backend is KernelBackend.TORCH and precision is Precision.INT4:
        return (
            f"int4 on torch's weight-only kernel (groupwise asymmetric int4, group {DEFAULT_INT4_GROUP_SIZE}; not NF4)"
        )
    if backend is KernelBackend.BITSANDBYTES:
        return f"{precision.value} on bitsandbytes ({'LLM.int8' if precision is Precision.INT8 else '4-bit NF4'})"
    return None


def four_bit_precision(backend: KernelBackend | None) -> Precision:
    """The ladder's 4-bit rung for a quantization backend: INT4 with torch's kernels, NF4 with bitsandbytes."""
    return Precision.INT4 if backend is KernelBackend.TORCH else Precision.NF4


class DType(enum.StrEnum):
    """Floating-point dtypes the planner reasons about (names as torch spells them)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def bytes(self) -> int:
        """Bytes per element."""
        return 4 if self is DType.FLOAT32 else 2

    def to_torch(self) -> Any:  # -> torch.dtype
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.value)


MIB = 1 << 20
# What a CPU load leaves resident beyond the weights (the scheme's libraries, allocator slack), and what it
# holds transiently while loading, per scheme: measured on the default model (torch 2.13 CPU, transformers
# 5.25, bitsandbytes 0.50), with the checkpoint's pages released after the load (docs/memory-model.md).
# Dense: ~110 MiB right after the load, but serving grows it: the first forward pages in the library code it runs
# (+68 MiB of file-backed pages in bf16, +12 MiB in INT8) and allocator slack follows the first batches. Measured
# 2026-12-04 in a fresh venv, bf16 at its minimum + 5% after 16 requests: RSS - runtime - weights - KV = 202 MiB
# against 188 MiB planned with 128 (activations, attention and logits are the other 60 MiB); 160 MiB used.
DENSE_CPU_RESIDUE_BYTES = 160 * MIB
BNB_CPU_RESIDUE_BYTES = 180 * MIB
# torch's weight-only kernels import nothing beyond torch: measured 120-127 MiB after the load (INT8 and INT4),
# and they run the same library code as dense when serving
TORCH_WEIGHT_ONLY_CPU_RESIDUE_BYTES = DENSE_CPU_RESIDUE_BYTES

NF4_BLOCK_SIZE = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_NESTED_BLOCK_SIZE = 256  # double quantization: absmax quantized to 8 bits in blocks of 256
NF4_QUANT_MAP_BYTES = 16 * 4  # the 16-entry fp32 code book per weight
NF4_NESTED_QUANT_MAP_BYTES = 256 * 4  # the 256-entry fp32 code book of the nested quantization


@dataclass(frozen=True)
class LinearShape:
    """One Linear layer a scheme converts: out x in weight, optional bias."""

    out_features: int
    in_features: int
    has_bias: bool = False

    @property
    def numel(self) -> int:
        """Weight elements."""
        return self.out_features * self.in_features


@dataclass(frozen=True)
class GptqParams:
    """What sizes a GPTQ checkpoint: read from its `quantization_config`."""

    bits: int = 4
    group_size: int = 128  # -1 in the config means one group per input row (we store in_features)
    desc_act: bool = False
    sym: bool = True


def _bias_bytes(linear: LinearShape, dense_dtype: DType) -> int:
    """A converted Linear's bias stays dense."""
    return linear.out_features * dense_dtype.bytes if linear.has_bias else 0


class SchemeHandler:
    """Base handler: a 16/32-bit dense scheme (no Linear is converted)."""

    precision: Precision

    def __init__(self, precision: Precision) -> None:
        self.precision = precision

    def converts_linears(self) -> bool:
        """True when the scheme replaces Linear layers with quantized ones."""
        return False

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        """Bytes one converted Linear contributes to `get_memory_footprint()` (weight, bias, buffers)."""
        return (linear.numel + (linear.out_features if linear.has_bias else 0)) * dense_dtype.bytes

    def linear_side_bytes(self, linear: LinearShape) -> int:
        """Bytes of quantization state kept outside parameters/buffers (not in the footprint)."""
        return 0

    def largest_dequant_bytes(self, linears: list[LinearShape], compute_dtype: DType) -> int:
        """Transient bytes to dequantize the largest converted weight for a matmul (0 for dense)."""
        return 0

    def load_kwargs(self, compute_dtype: DType) -> dict[str, Any]:
        """Keyword arguments for `from_pretrained` (imports torch/transformers lazily)."""
        return {"dtype": compute_dtype.to_torch()}

    def cpu_residue_bytes(self) -> int:
        """Process memory a CPU load leaves resident beyond the weights (libraries it imports, allocator slack)."""
        return DENSE_CPU_RESIDUE_BYTES

    def cpu_load_transient_bytes(self, checkpoint_bytes: int, converts_dtype: bool) -> int:
        """Extra process memory while loading on CPU, released before serving. Dense: the checkpoint's pages
        while they are converted to another dtype, and the engine's oneDNN prepacking of the converted weights
        (none when the weights are the file's own pages). Measured fp32 from the bf16 default model: 1.20 x the
        checkpoint on the development VM, 1.28 x on CI (1.5 x used)."""
        return checkpoint_bytes * 3 // 2 if converts_dtype else 0

    def convert_loaded(self, model: Any, should_convert: Callable[[str], bool], compute_dtype: DType) -> str | None:
        """Quantize a model `from_pretrained` loaded in `compute_dtype`, in place, where the scheme is fitserve's
        own (torch kernels); returns a line for the log, or None when there was nothing to do."""
        return None


class TorchWeightOnlyHandler(SchemeHandler):
    """Common to torch's weight-only CPU schemes: the model is loaded in 16-bit, then quantized Linear by Linear
    (`quant/weight_only.py`); what that load costs the process on CPU."""

    def converts_linears(self) -> bool:
        return True

    def cpu_residue_bytes(self) -> int:
        return TORCH_WEIGHT_ONLY_CPU_RESIDUE_BYTES

    def cpu_load_transient_bytes(self, checkpoint_bytes: int, converts_dtype: bool) -> int:
        """The 16-bit weights are views of the mapped file; each Linear's file pages are given back as soon as it
        is quantized (`quantize_linears`), so what remains is the quantizer's temporaries in the heap and the pages
        of the tensors kept in 16-bit. Measured in a served process on the default model (peak RSS - runtime -
        residue - weights): 0.29-0.30 x the checkpoint (INT8 3 runs, one beside two busy cores; INT4 2 runs), 0.45
        x if the residue is the 120-127 MiB measured right after the load; 0.75 x used. (Before the pages were
        given back per Linear: 0.91-1.48 x here and 2.2 x once on CI.)"""
        return checkpoint_bytes * 3 // 4


class TorchInt8Handler(TorchWeightOnlyHandler):
    """torch weight-only INT8 on CPU: int8 weight (1 byte) + one scale per output row in the compute dtype (both
    buffers, so inside the footprint); `_weight_int8pack_mm` dequantizes in registers for a few rows, and from
    `INT8_DENSE_MATMUL_MIN_ROWS` rows (prefill) one Linear's weight is converted to 16 bits for the call."""

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        bias = _bias_bytes(linear, dense_dtype)
        return linear.numel + linear.out_features * dense_dtype.bytes + bias

    def largest_dequant_bytes(self, linears: list[LinearShape], compute_dtype: DType) -> int:
        """The 16-bit copy of the widest weight a prefill matmul converts: twice the largest Linear, because the
        engine joins a Llama layer's two largest (gate and up projections) into one (joined_projections.py)."""
        return 2 * max((lin.numel for lin in linears), default=0) * compute_dtype.bytes

    def convert_loaded(self, model: Any, should_convert: Callable[[str], bool], compute_dtype: DType) -> str | None:
        from fitserve.quant.weight_only import WeightOnlyScheme, quantize_linears

        done = quantize_linears(model, WeightOnlyScheme.INT8, should_convert, dtype=compute_dtype.to_torch())
        return (
            f"int8 weight-only (torch _weight_int8pack_mm, per-channel symmetric): {done.converted} Linears, "
            f"{done.released_bytes / MIB:.1f} MiB of checkpoint pages given back as they were converted"
        )


class TorchInt4Handler(TorchWeightOnlyHandler):
    """torch weight-only INT4 on CPU: two weights per byte + a scale and a zero per `group_size` weights of a row
    in the compute dtype (buffers); Linears the kernel cannot take (`int4_fits`) stay dense."""

    def __init__(self, precision: Precision, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> None:
        super().__init__(precision)
        self.group_size = group_size

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        if not int4_fits(linear.out_features, linear.in_features, self.group_size):
            return super().linear_footprint_bytes(linear, dense_dtype)
        bias = _bias_bytes(linear, dense_dtype)
        groups = linear.in_features // self.group_size
        return linear.numel // 2 + groups * linear.out_features * 2 * dense_dtype.bytes + bias

    def convert_loaded(self, model: Any, should_convert: Callable[[str], bool], compute_dtype: DType) -> str | None:
        from fitserve.quant.weight_only import WeightOnlyScheme, quantize_linears

        done = quantize_linears(
            model, WeightOnlyScheme.INT4, should_convert, dtype=compute_dtype.to_torch(), group_size=self.group_size
        )
        return (
            f"int4 weight-only (torch _weight_int4pack_mm_for_cpu, groupwise asymmetric, group "
            f"{self.group_size}; not NF4): {done.converted} Linears, {done.kept_dense} kept dense, "
            f"{done.released_bytes / MIB:.1f} MiB of checkpoint pages given back as they were converted"
        )


class Int8Handler(SchemeHandler):
    """bitsandbytes LLM.int8: int8 weight (1 byte) + one fp32 scale per output row (`SCB`, outside params)."""

    def converts_linears(self) -> bool:
        return True

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        bias = _bias_bytes(linear, dense_dtype)
        return linear.numel + bias

    def linear_side_bytes(self, linear: LinearShape) -> int:
        return linear.out_features * 4

    def largest_dequant_bytes(self, linears: list[LinearShape], compute_dtype: DType) -> int:
        return max((lin.numel for lin in linears), default=0) * compute_dtype.bytes

    def load_kwargs(self, compute_dtype: DType) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        return {"dtype": compute_dtype.to_torch(), "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}

    def cpu_residue_bytes(self) -> int:
        return BNB_CPU_RESIDUE_BYTES

    def cpu_load_transient_bytes(self, checkpoint_bytes: int, converts_dtype: bool) -> int:
        # the checkpoint's pages plus the 16-bit weights bitsandbytes quantizes from (measured in a served
        # process: 1.9 x; 1.3 x in a bare one)
        return checkpoint_bytes * 2


class Nf4Handler(SchemeHandler):
    """bitsandbytes NF4: two weights per byte + fp32 absmax per 64-block (8-bit + nested fp32 with double quant)."""

    def __init__(self, precision: Precision, double_quant: bool = False) -> None:
        super().__init__(precision)
        self.double_quant = double_quant

    def converts_linears(self) -> bool:
        return True

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        bias = _bias_bytes(linear, dense_dtype)
        return math.ceil(linear.numel / 2) + bias

    def linear_side_bytes(self, linear: LinearShape) -> int:
        blocks = math.ceil(linear.numel / NF4_BLOCK_SIZE)
        if not self.double_quant:
            return blocks * 4 + NF4_QUANT_MAP_BYTES
        nested_blocks = math.ceil(blocks / NF4_NESTED_BLOCK_SIZE)
        return blocks + nested_blocks * 4 + NF4_QUANT_MAP_BYTES + NF4_NESTED_QUANT_MAP_BYTES

    def largest_dequant_bytes(self, linears: list[LinearShape], compute_dtype: DType) -> int:
        return max((lin.numel for lin in linears), default=0) * compute_dtype.bytes

    def load_kwargs(self, compute_dtype: DType) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype.to_torch(),
        )
        return {"dtype": compute_dtype.to_torch(), "quantization_config": config}

    def cpu_residue_bytes(self) -> int:
        return BNB_CPU_RESIDUE_BYTES

    def cpu_load_transient_bytes(self, checkpoint_bytes: int, converts_dtype: bool) -> int:
        # the checkpoint's pages plus 16-bit copies quantized from (measured in a served process: 2.8 x)
        return checkpoint_bytes * 3


class GptqHandler(SchemeHandler):
    """A pre-quantized GPTQ checkpoint (GPTQModel QuantLinear; all tensors are buffers, so in the footprint).

    Per converted Linear (in = in_features, out = out_features, b = bits, g = group size):
    qweight int32 packed in*out*b/8, qzeros int32 (in/g)*out*b/8, scales fp16 (in/g)*out*2, g_idx int32 in*4,
    and two int32 shift tables of 32/b entries (GPTQModel's torch kernel registers them as buffers).
    """

    def __init__(self, precision: Precision, params: GptqParams) -> None:
        super().__init__(precision)
        self.params = params

    def converts_linears(self) -> bool:
        return True

    def linear_footprint_bytes(self, linear: LinearShape, dense_dtype: DType) -> int:
        bits = self.params.bits
        group = linear.in_features if self.params.group_size <= 0 else self.params.group_size
        groups = math.ceil(linear.in_features / group)
        qweight = math.ceil(linear.in_features * bits / 32) * linear.out_features * 4
        qzeros = groups * math.ceil(linear.out_features * bits / 32) * 4
        scales = groups * linear.out_features * 2
        g_idx = linear.in_features * 4
        bias = linear.out_features * 2 if linear.has_bias else 0
        shifts = 2 * (32 // bits) * 4  # GPTQModel's CPU kernel: two int32 bit-shift tables per layer
        return qweight + qzeros + scales + g_idx + bias + shifts

    def largest_dequant_bytes(self, linears: list[LinearShape], compute_dtype: DType) -> int:
        return max((lin.numel for lin in linears), default=0) * compute_dtype.bytes

    def load_kwargs(self, compute_dtype: DType) -> dict[str, Any]:
        # The checkpoint's own quantization_config drives the load; only the dense dtype is ours to pick.
        return {"dtype": compute_dtype.to_torch()}


def handler_for(
    precision: Precision,
    *,
    double_quant: bool = False,
    gptq: GptqParams | None = None,
    backend: KernelBackend | None = None,
    int4_group_size: int = DEFAULT_INT4_GROUP_SIZE,
) -> SchemeHandler:
    """The one factory: the handler for a precision on its kernel backend (INT8 without one: bitsandbytes)."""
    if precision is Precision.INT8:
        return TorchInt8Handler(precision) if backend is KernelBackend.TORCH else Int8Handler(precision)
    if precision is Precision.INT4:
        return TorchInt4Handler(precision, int4_group_size)
    if precision is Precision.NF4:
        return Nf4Handler(precision, double_quant=double_quant)
    if precision is Precision.GPTQ:
        return GptqHandler(precision, gptq or GptqParams())
    return SchemeHandler(precision)


def dense_dtype_for(precision: Precision, compute_dtype: DType) -> DType:
    """The dtype of the tensors a scheme leaves dense (embeddings, norms, lm_head, the whole model if 16/32-bit)."""
    if precision is Precision.FP32:
        return DType.FLOAT32
    if precision is Precision.FP16:
        return DType.FLOAT16
    if precision is Precision.BF16:
        return DType.BFLOAT16
    return compute_dtype


def parse_precision(value: str | Precision) -> Precision | None:
    """Parse `--precision`: "auto" gives None, otherwise a Precision; raises ValueError naming the choices."""
    if isinstance(value, Precision):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return None
    try:
        return Precision(text)
    except ValueError:
        choices = ", ".join(["auto", *(p.value for p in Precision)])
        raise ValueError(f"unknown precision {value!r}; choose one of: {choices}") from None
