"""What a model needs, per precision, without loading a single weight.

The skeleton is built from the config on the meta device (accelerate's `init_empty_weights`), and every
parameter is sorted into "converted by the scheme" (the Linear layers bitsandbytes/GPTQ replace, chosen by
the same rule transformers uses) or "kept dense" (embeddings, norms, lm_head; tied weights counted once).
Formulas are in docs/memory-model.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fitserve.quant.schemes import (
    DType,
    GptqParams,
    KernelBackend,
    LinearShape,
    Precision,
    dense_dtype_for,
    handler_for,
)

logger = logging.getLogger(__name__)

# Per GPU, device memory that is not torch's: CUDA context, cuBLAS/cuBLASLt workspaces, lazily loaded kernel
# modules. Measured on an H200 (torch 2.11+cu130, driver 580): 527 MiB right after CUDA init, 803 MiB once an
# INT8 model had served a load test (device used 1171 MiB minus torch reserved 368 MiB); docs/benchmarks.md.
CUDA_CONTEXT_BYTES = 800 << 20
# On CPU the budget is the server process's memory, and the process holds this much before it loads a weight:
# the interpreter, torch, transformers and the HTTP stack (resident pages of their shared libraries included).
# Measured: `fitserve serve` logs "process RSS 277.9 MiB" right before loading (2026-11-26, torch 2.13 CPU).
CPU_RUNTIME_BYTES = 288 << 20
SAMPLING_COPIES = 2  # fp32 logits + the fp32 probabilities sampling derives from them


@dataclass(frozen=True)
class ModelShape:
    """Everything the estimate needs from a model, gathered once from its meta-device skeleton."""

    model_path: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    total_params: int  # unique parameters (tied ones once)
    dense_params: int  # parameters no scheme converts (embeddings, norms, lm_head, biases of dense layers)
    buffer_bytes: int  # registered buffers (e.g. rotary inv_freq), at their own dtype
    linears: tuple[LinearShape, ...]  # the Linear layers INT8/NF4/GPTQ convert
    prequantized: Precision | None = None  # GPTQ / bitsandbytes-serialized checkpoints
    gptq: GptqParams | None = None
    config_dtype: str | None = None
    layers_module: str | None = None  # where the decoder layers live, e.g. "model.layers" (per-layer device_map)

    @property
    def converted_params(self) -> int:
        """Parameters inside converted Linear layers (weights and biases)."""
        return sum(lin.numel + (lin.out_features if lin.has_bias else 0) for lin in self.linears)


@dataclass(frozen=True)
class Overhead:
    """Runtime memory beyond weights and KV cache, with its parts (bytes)."""

    activation_bytes: int
    attention_bytes: int
    logits_bytes: int
    dequant_bytes: int
    cuda_context_bytes: int = 0
    cpu_runtime_bytes: int = 0  # the process before it loads a weight (measured at start by `fitserve serve`)
    cpu_residue_bytes: int = 0  # what the scheme's CPU load leaves resident beyond the weights

    @property
    def total_bytes(self) -> int:
        """Sum of the parts."""
        return (
            self.activation_bytes
            + self.attention_bytes
            + self.logits_bytes
            + self.dequant_bytes
            + self.cuda_context_bytes
            + self.cpu_runtime_bytes
            + self.cpu_residue_bytes
        )


@dataclass(frozen=True)
class PrecisionEstimate:
    """The bytes one precision needs."""

    precision: Precision
    compute_dtype: DType  # dtype of dense tensors, activations and the KV cache
    weights_bytes: int  # what `get_memory_footprint()` will report (parameters + buffers)
    quant_state_bytes: int  # quantization scales kept outside parameters (real memory, not in the footprint)
    kv_bytes_per_token: int
    overhead: Overhead = field(repr=False)
    layer_weights_bytes: int = 0  # the part of weights + quant state inside the decoder layers
    load_peak_bytes: int = 0  # CPU: the process's peak while loading (runtime + residue + weights + transient)
    backend: KernelBackend | None = None  # the kernels a quantized precision runs on

    @property
    def overhead_bytes(self) -> int:
        """Runtime overhead total."""
        return self.overhead.total_bytes


def _load_config(model: str | Path, trust_remote_code: bool = False) -> Any:
    from fitserve.quant.model_store import load_config

    return load_config(model, trust_remote_code=trust_remote_code)


def _gptq_params(qcfg: dict[str, Any]) -> GptqParams:
    return GptqParams(
        bits=int(qcfg.get("bits", 4)),
        group_size=int(qcfg.get("group_size", 128)),
        desc_act=bool(qcfg.get("desc_act", False)),
        sym=bool(qcfg.get("sym", True)),
    )


def _prequantized(config: Any) -> tuple[Precision | None, GptqParams | None, dict[str, Any]]:
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return None, None, {}
    qdict = qcfg if isinstance(qcfg, dict) else qcfg.to_dict()
    method = str(qdict.get("quant_method", "")).lower()
    if method == "gptq":
        return Precision.GPTQ, _gptq_params(qdict), qdict
    if method == "bitsandbytes":
        if qdict.get("load_in_8bit"):
            return Precision.INT8, None, qdict
        if qdict.get("load_in_4bit") and qdict.get("bnb_4bit_quant_type", "nf4") == "nf4":
            return Precision.NF4, None, qdict
    raise ValueError(
        f"unsupported pre-quantized checkpoint (quant_method={method!r}); fitserve loads GPTQ, "
        f"bitsandbytes INT8/NF4 or unquantized checkpoints"
    )


def _skip_patterns(model: Any, qdict: dict[str, Any]) -> list[str]:
    """Module names the quantizer leaves dense, by transformers' own rule when it is importable."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        patterns = list(get_keys_to_not_convert(model))
    except ImportError:  # pragma: no cover - older/newer transformers layout
        out = model.get_output_embeddings()
        patterns = [n for n, m in model.named_modules() if out is not None and m is out]
    patterns += list(qdict.get("llm_int8_skip_modules") or qdict.get("modules_to_not_convert") or [])
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if qdict.get("quant_method") == "gptq" and qdict.get("lm_head"):
        patterns = [p for p in patterns if p != "lm_head"]
    return patterns


def _should_convert(name: str, patterns: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return bool(should_convert_module(name, patterns))
    except ImportError:  # pragma: no cover
        return not any(name == p or name.startswith(p + ".") or name.endswith(p) for p in patterns)


def linear_conversion_rule(model: Any, qdict: dict[str, Any] | None = None) -> Callable[[str], bool]:
    """`rule(name)`: whether the `nn.Linear` called `name` in `model` is one a scheme converts (transformers'
    rule: not the output embedding, tied weights or the modules the config keeps dense)."""
    patterns = _skip_patterns(model, qdict or {})
    return lambda name: bool(name) and _should_convert(name, patterns)


SHAPE_CACHE_VERSION = 2  # 2: layers_module


def _shape_cache_file(model: str | Path, cache_dir: Path) -> Path | None:
    """Cache file for a local model: keyed by its config.json bytes and the transformers version."""
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf_version = version("transformers")
    except PackageNotFoundError:  # pragma: no cover
        tf_version = "unknown"
    digest = hashlib.sha256(config_file.read_bytes() + f"|{tf_version}|{SHAPE_CACHE_VERSION}".encode()).hexdigest()
    return cache_dir / f"{digest[:32]}.json"


def shape_to_json(shape: ModelShape) -> dict[str, Any]:
    """A JSON-ready dict of a ModelShape (Linear layers as [out, in, bias] triples)."""
    out = asdict(shape)
    out["linears"] = [[lin.out_features, lin.in_features, lin.has_bias] for lin in shape.linears]
    out["prequantized"] = shape.prequantized.value if shape.prequantized else None
    return out


def shape_from_json(data: dict[str, Any]) -> ModelShape:
    """Inverse of shape_to_json."""
    fields = dict(data)
    fields["linears"] = tuple(LinearShape(int(o), int(i), bool(b)) for o, i, b in data["linears"])
    fields["prequantized"] = Precision(data["prequantized"]) if data.get("prequantized") else None
    fields["gptq"] = GptqParams(**data["gptq"]) if data.get("gptq") else None
    return ModelShape(**fields)


def inspect_model(
    model: str | Path, cache_dir: Path | None = None, use_cache: bool = True, trust_remote_code: bool = False
) -> ModelShape:
    """The model's shape, from the on-disk shape cache or by building its meta-device skeleton.

    The cache (default `$FITSERVE_HOME/shapes`) holds one small JSON per local model, keyed by the bytes of
    its config.json and the transformers version, so `fitserve plan` skips torch/transformers after the first
    run. A missing or unreadable entry is rebuilt; hub ids are never cached.
    """
    cache_file = None
    if use_cache:
        if cache_dir is None:
            from fitserve.quant.model_store import fitserve_home

            cache_dir = fitserve_home() / "shapes"
        cache_file = _shape_cache_file(model, cache_dir)
    if cache_file is not None and cache_file.is_file():
        try:
            shape = shape_from_json(json.loads(cache_file.read_text()))
            return replace(shape, model_path=str(model))
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable shape cache %s (%s)", cache_file, error)
    shape = build_shape(model, trust_remote_code=trust_remote_code)
    if cache_file is not None:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(shape_to_json(shape)))
            tmp.replace(cache_file)
        except OSError as error:  # a read-only home must not break planning
            logger.debug("could not write shape cache %s: %s", cache_file, error)
    return shape


def build_shape(model: str | Path, trust_remote_code: bool = False) -> ModelShape:
    """Build the model skeleton on the meta device and measure it (no weights are read).

    `trust_remote_code` lets a model repository's own modelling code run (off unless the user asked).
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _load_config(model, trust_remote_code)
    prequantized, gptq, qdict = _prequantized(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # tied embeddings must share one parameter to be counted once
    converts = linear_conversion_rule(skeleton, qdict)
    linears: list[LinearShape] = []
    converted_ids: set[int] = set()
    for name, module in skeleton.named_modules():
        if type(module) is torch.nn.Linear and converts(name):
            linears.append(LinearShape(module.out_features, module.in_features, module.bias is not None))
            converted_ids.update(id(p) for p in module.parameters(recurse=False))
    params = list(skeleton.parameters())  # unique: tied parameters appear once
    total = sum(p.numel() for p in params)
    dense = sum(p.numel() for p in params if id(p) not in converted_ids)
    buffers = sum(b.numel() * b.element_size() for b in skeleton.buffers())
    heads = int(text_config.num_attention_heads)
    hidden = int(text_config.hidden_size)
    head_dim = int(getattr(text_config, "head_dim", None) or hidden // heads)
    dtype = getattr(config, "dtype", None)
    num_layers = int(text_config.num_hidden_layers)
    return ModelShape(
        model_path=str(model),
        architecture=type(skeleton).__name__,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=int(getattr(text_config, "intermediate_size", 4 * hidden)),
        num_attention_heads=heads,
        num_kv_heads=int(getattr(text_config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(text_config.vocab_size),
        max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        total_params=total,
        dense_params=dense,
        buffer_bytes=buffers,
        linears=tuple(linears),
        prequantized=prequantized,
        gptq=gptq,
        config_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
        layers_module=_layers_module(skeleton, num_layers),
    )


def _layers_module(skeleton: Any, num_layers: int) -> str | None:
    """The name of the ModuleList holding the decoder layers (e.g. "model.layers"), None when not found."""
    import torch

    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name:
            return str(name)
    return None


def kv_bytes_per_token(shape: ModelShape, kv_dtype: DType) -> int:
    """KV cache bytes per token: 2 (K and V) x layers x kv_heads x head_dim x dtype bytes (GQA aware)."""
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * kv_dtype.bytes


def weights_bytes(
    shape: ModelShape,
    precision: Precision,
    compute_dtype: DType,
    double_quant: bool = False,
    backend: KernelBackend | None = None,
) -> tuple[int, int]:
    """(footprint bytes, quant-state bytes) of the weights in `precision`.

    footprint = dense params x dense dtype bytes + buffers + sum over converted Linears of the scheme's
    per-layer bytes (16/32-bit schemes convert nothing, so every parameter is dense). quant-state = the
    scheme's scales kept outside parameters (INT8 per-row fp32 SCB; NF4 absmax), not in the footprint.
    `backend` is the quantized precision's kernel backend (torch's kernels keep their scales as buffers).
    """
    handler = handler_for(precision, double_quant=double_quant, gptq=shape.gptq, backend=backend)
    dense_dtype = dense_dtype_for(precision, compute_dtype)
    if not handler.converts_linears():
        return shape.total_params * dense_dtype.bytes + shape.buffer_bytes, 0
    footprint = shape.dense_params * dense_dtype.bytes + shape.buffer_bytes
    footprint += sum(handler.linear_footprint_bytes(lin, dense_dtype) for lin in shape.linears)
    side = sum(handler.linear_side_bytes(lin) for lin in shape.linears)
    return footprint, side


def layer_weights_bytes(
    shape: ModelShape,
    precision: Precision,
    compute_dtype: DType,
    double_quant: bool = False,
    backend: KernelBackend | None = None,
) -> int:
    """Bytes of the Linear layers inside the decoder layers (footprint + quant state): what moves with a layer."""
    handler = handler_for(precision, double_quant=double_quant, gptq=shape.gptq, backend=backend)
    dense_dtype = dense_dtype_for(precision, compute_dtype)
    if not handler.converts_linears():
        return sum(lin.numel + (lin.out_features if lin.has_bias else 0) for lin in shape.linears) * dense_dtype.bytes
    return sum(
        handler.linear_footprint_bytes(lin, dense_dtype) + handler.linear_side_bytes(lin) for lin in shape.linears
    )


def overhead(
    shape: ModelShape,
    precision: Precision,
    compute_dtype: DType,
    *,
    max_batch_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    n_cuda_devices: int = 0,
    double_quant: bool = False,
    cpu_runtime_bytes: int | None = None,
    backend: KernelBackend | None = None,
) -> Overhead:
    """Runtime overhead of serving, in bytes (a = activation dtype bytes, T = max_batch_tokens):

    - activations: T x max(2h + 3i, 2h + (2 q_heads + 2 kv_heads) x head_dim) x a, the widest point of one
      decoder layer in a packed prefill (residual + normed input + MLP gate/up/product, or Q/K/V/out);
      layers run one after the other, so one layer's peak counts.
    - attention: q_heads x T x max_model_len x 4, the fp32 score matrix of one layer if the attention
      kernel materialises it (the math path does; flash kernels do not: an upper bound).
    - logits: min(max_num_seqs, T) x vocab x 4 x 2 (fp32 logits of the last token of each sequence, and the
      probabilities sampling derives from them).
    - dequant: the largest converted weight dequantized to the compute dtype for one matmul (bitsandbytes
      INT8/NF4, GPTQ; torch's weight-only kernels dequantize in registers: 0).
    - CUDA context: a fixed amount per GPU (its device memory is what a GPU budget covers).
    - CPU runtime: on CPU, where the budget is the process's memory, what the process holds before loading
      (`cpu_runtime_bytes`, measured by `fitserve serve` at start; None: the `CPU_RUNTIME_BYTES` estimate),
      plus what the scheme's load leaves resident beyond the weights (its handler says).
    """
    a = compute_dtype.bytes
    h, i = shape.hidden_size, shape.intermediate_size
    attn_width = (2 * shape.num_attention_heads + 2 * shape.num_kv_heads) * shape.head_dim
    activation = max_batch_tokens * max(2 * h + 3 * i, 2 * h + attn_width) * a
    attention = shape.num_attention_heads * max_batch_tokens * max_model_len * 4
    rows = min(max_num_seqs, max_batch_tokens)
    logits = rows * shape.vocab_size * 4 * SAMPLING_COPIES
    handler = handler_for(precision, double_quant=double_quant, gptq=shape.gptq, backend=backend)
    dequant = handler.largest_dequant_bytes(list(shape.linears), compute_dtype) if handler.converts_linears() else 0
    runtime = 0 if n_cuda_devices else (CPU_RUNTIME_BYTES if cpu_runtime_bytes is None else cpu_runtime_bytes)
    residue = 0 if n_cuda_devices else handler.cpu_residue_bytes()
    cuda = CUDA_CONTEXT_BYTES * n_cuda_devices
    return Overhead(activation, attention, logits, dequant, cuda, runtime, residue)


def checkpoint_bytes(shape: ModelShape) -> int:
    """Bytes of the checkpoint's weights on disk (parameters at the config's dtype; 2 bytes when unknown)."""
    dtype = shape.config_dtype if shape.config_dtype in {d.value for d in DType} else DType.BFLOAT16.value
    return shape.total_params * DType(dtype).bytes + shape.buffer_bytes


def cpu_load_peak_bytes(shape: ModelShape, est: PrecisionEstimate, double_quant: bool = False) -> int:
    """The process's peak while loading on CPU: runtime + residue + weights + the scheme's transient copies.

    Loading happens before the KV cache and the serving buffers exist, so they are not part of it.
    """
    over = est.overhead
    handler = handler_for(est.precision, double_quant=double_quant, gptq=shape.gptq, backend=est.backend)
    converts = shape.prequantized is None and shape.config_dtype != dense_dtype_for(est.precision, est.compute_dtype)
    transient = 0 if shape.prequantized else handler.cpu_load_transient_bytes(checkpoint_bytes(shape), converts)
    weights = est.weights_bytes + est.quant_state_bytes
    return over.cpu_runtime_bytes + over.cpu_residue_bytes + weights + transient


def estimate_precision(
    shape: ModelShape,
    precision: Precision,
    compute_dtype: DType,
    *,
    max_batch_tokens: int,
    max_num_seqs: int,
    max_model_len: int,
    n_cuda_devices: int = 0,
    double_quant: bool = False,
    cpu_runtime_bytes: int | None = None,
    backend: KernelBackend | None = None,
) -> PrecisionEstimate:
    """All the bytes one precision needs (on `backend`, for a quantized precision)."""
    dense_dtype = dense_dtype_for(precision, compute_dtype)
    footprint, side = weights_bytes(shape, precision, dense_dtype, double_quant, backend)
    over = overhead(
        shape,
        precision,
        dense_dtype,
        max_batch_tokens=max_batch_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        n_cuda_devices=n_cuda_devices,
        double_quant=double_quant,
        cpu_runtime_bytes=cpu_runtime_bytes,
        backend=backend,
    )
    layers = layer_weights_bytes(shape, precision, dense_dtype, double_quant, backend)
    kv = kv_bytes_per_token(shape, dense_dtype)
    est = PrecisionEstimate(precision, dense_dtype, footprint, side, kv, over, layers, backend=backend)
    if n_cuda_devices:
        return est
    return replace(est, load_peak_bytes=cpu_load_peak_bytes(shape, est, double_quant))


__all__ = [
    "ModelShape",
    "Overhead",
    "PrecisionEstimate",
    "estimate_precision",
    "inspect_model",
    "kv_bytes_per_token",
    "layer_weights_bytes",
    "linear_conversion_rule",
    "overhead",
    "weights_bytes",
]
