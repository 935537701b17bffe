"""Budget + estimates -> Plan: the precision that fits, the KV cache capacity it leaves, and why.

Pure logic over `Budget` and `ModelShape`; both can be injected, so the ladder is unit-tested with fake
devices and fake models.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fitserve.quant.budget import Budget, MemoryProbe, SystemProbe, detect_budget, format_bytes
from fitserve.quant.estimate import ModelShape, PrecisionEstimate, estimate_precision, inspect_model
from fitserve.quant.placement import (
    DeviceShare,
    align_down,
    device_map_for,
    kv_cache_tokens,
    layer_costs,
    split_layers,
)
from fitserve.quant.schemes import (
    DType,
    KernelBackend,
    Precision,
    backend_for,
    four_bit_precision,
    kernel_note,
    parse_precision,
)

logger = logging.getLogger(__name__)

TYPICAL_REQUEST_TOKENS = 512
MAX_MEMORY_HEADROOM = 1.10  # per-GPU weight share x this, so accelerate's placement has room to round


class PlanInputError(ValueError):
    """The request cannot be planned as asked (bad value, wrong precision for this checkpoint)."""


class PlanRequest(BaseModel):
    """What to plan for. `model=None` means the cached default model."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    model: str | Path | None = None
    memory_budget_bytes: int | None = Field(default=None, gt=0)
    max_model_len: int = Field(default=2048, gt=0)
    min_concurrency: int = Field(default=1, ge=1)
    precision: Precision | Literal["auto"] = "auto"
    force: bool = False
    max_batch_tokens: int = Field(default=2048, gt=0)  # tokens in one forward (prefill chunk + decodes)
    # sequences in one step: rows of the logits buffer, and a cap on useful KV. 8 = `fitserve serve`'s
    # --max-batch-size default, so `fitserve plan` and `fitserve serve` agree out of the box.
    max_num_seqs: int = Field(default=8, gt=0)
    device: str | None = None  # None: all GPUs when CUDA is present, else "cpu"
    double_quant: bool = False  # NF4 double quantization (smaller absmax, slower load)
    # on CPUs without native bf16 (AVX2 only) try fp32 first: measured 2x+ faster serving there (docs/memory-model.md)
    prefer_fp32_on_cpu: bool = True
    max_kv_tokens: int | None = Field(default=None, gt=0)  # cap on KV capacity (always <= max_num_seqs x len)
    block_size_tokens: int = Field(default=16, gt=0)  # the engine's KV page: capacity is whole blocks
    # CPU: what this process holds before loading, measured by `fitserve serve` at start (None: an estimate)
    cpu_runtime_bytes: int | None = Field(default=None, ge=0)
    trust_remote_code: bool = False  # let the model repository's own code run (config/skeleton); off by default
    # kernels for INT8 (and with it the 4-bit rung): auto = torch's weight-only kernels on CPU (INT8, INT4),
    # bitsandbytes on CUDA (INT8, NF4); "bitsandbytes" keeps LLM.int8/NF4 on CPU too
    quant_backend: KernelBackend | Literal["auto"] = "auto"

    @field_validator("max_num_seqs", "max_batch_tokens", "max_model_len", "min_concurrency", mode="before")
    @classmethod
    def _default_when_none(cls, value: Any, info: Any) -> Any:
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("precision", mode="before")
    @classmethod
    def _parse_precision(cls, value: Any) -> Precision | str:
        parsed = parse_precision(value)
        return "auto" if parsed is None else parsed


@dataclass(frozen=True)
class Candidate:
    """One rung of the ladder, evaluated against the budget."""

    precision: Precision
    dtype: DType  # dense / compute / KV dtype
    weights_bytes: int
    quant_state_bytes: int
    kv_bytes_per_token: int
    overhead_bytes: int
    min_kv_bytes: int  # KV cache for min_concurrency x max_model_len tokens (+ the scratch block)
    total_bytes: int  # max(weights + quant state + overhead + min KV, CPU load peak): the minimum it needs
    fits: bool
    kv_capacity_tokens: int  # whole KV blocks; 0 when it does not fit
    shortfall_bytes: int  # 0 when it fits
    device_split: tuple[DeviceShare, ...] = ()  # per device: layers, weights, overhead, KV (empty: does not fit)
    load_peak_bytes: int = 0  # CPU: the process's peak while loading (0 on GPU)
    backend: KernelBackend | None = None  # the kernels a quantized precision runs on
    # the overhead's attention scratch: one layer's transient attention memory (the engine's batched decode
    # attention gathers padded K/V only while it fits in this)
    attention_scratch_bytes: int = 0

    def max_seqs(self, tokens_per_seq: int) -> int:
        """Concurrent sequences of `tokens_per_seq` tokens the KV capacity holds."""
        return self.kv_capacity_tokens // tokens_per_seq if tokens_per_seq > 0 else 0

    def to_json(self, max_model_len: int) -> dict[str, Any]:
        """JSON-ready dict (precision as its name)."""
        out = asdict(self)
        out.pop("device_split")
        out["precision"] = self.precision.value
        out["dtype"] = self.dtype.value
        out["backend"] = self.backend.value if self.backend else None
        out["max_concurrent_seqs_full_context"] = self.max_seqs(max_model_len)
        out[f"max_concurrent_seqs_{TYPICAL_REQUEST_TOKENS}"] = self.max_seqs(TYPICAL_REQUEST_TOKENS)
        return out


@dataclass(frozen=True)
class Plan:
    """The decision: what to load, where, and how much KV cache the rest of the budget buys."""

    model_path: str
    precision: Precision | None  # None only inside NothingFitsError
    device: str  # "cpu" | "cuda:N" | "cuda" (several GPUs)
    budget_bytes: int
    weights_bytes: int
    quant_state_bytes: int
    kv_bytes_per_token: int
    kv_dtype: str  # torch dtype name, e.g. "bfloat16"
    overhead_bytes: int
    total_bytes: int
    kv_capacity_tokens: int  # whole blocks of `block_size_tokens`: what the engine's block pool hands out
    max_model_len: int
    min_concurrency: int
    reason: str
    candidates: list[Candidate] = field(default_factory=list)
    device_map: str | dict[str, Any] | None = None  # for from_pretrained
    max_memory: dict[int | str, int] | None = None  # per-device, multi-GPU only
    double_quant: bool = False
    budget_source: str = ""
    prequantized: bool = False  # the checkpoint is already quantized (GPTQ / bitsandbytes-serialized)
    block_size_tokens: int = 16
    spare_bytes: int = 0  # budget left after weights, quant state, overhead and the whole KV cache
    device_split: tuple[DeviceShare, ...] = ()  # per device: layers, weights, overhead and KV cache
    quant_backend: KernelBackend | None = None  # kernels of a quantized precision (torch / bitsandbytes)
    attention_scratch_bytes: int = 0  # part of the overhead: one layer's transient attention memory

    def with_runtime_bytes(self, extra_bytes: int, note: str) -> Plan:
        """This plan with `extra_bytes` of its spare budget counted as runtime overhead, for a choice made once the
        precision is known (a compiled decode step on CPU), and `note` added to the reason."""
        if not 0 <= extra_bytes <= self.spare_bytes:
            raise ValueError(f"{extra_bytes} bytes do not fit in the plan's {self.spare_bytes} spare bytes")
        return replace(
            self,
            overhead_bytes=self.overhead_bytes + extra_bytes,
            total_bytes=self.total_bytes + extra_bytes,
            spare_bytes=self.spare_bytes - extra_bytes,
            reason=f"{self.reason}; {note}" if note else self.reason,
        )

    @property
    def kv_capacity_blocks(self) -> int:
        """KV cache blocks the engine hands to sequences (the capacity is always whole blocks)."""
        return self.kv_capacity_tokens // self.block_size_tokens

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache the engine allocates: the capacity plus its scratch block."""
        return self.kv_bytes_per_token * kv_cache_tokens(self.kv_capacity_tokens, self.block_size_tokens)

    @property
    def compute_dtype(self) -> DType:
        """The dense/activation dtype (also the KV dtype)."""
        return DType(self.kv_dtype)

    @property
    def max_concurrent_seqs_full_context(self) -> int:
        """Sequences of max_model_len tokens the KV capacity holds at once."""
        return self.kv_capacity_tokens // self.max_model_len

    @property
    def max_concurrent_seqs_typical(self) -> int:
        """Sequences of 512 tokens the KV capacity holds at once."""
        return self.kv_capacity_tokens // TYPICAL_REQUEST_TOKENS

    def verdict(self) -> str:
        """The one-line verdict for humans."""
        if self.precision is None:
            return f"NOTHING FITS in {format_bytes(self.budget_bytes)} on {self.device}: " + self.reason.splitlines()[0]
        return (
            f"{self.precision.value.upper()} on {self.device}: {self.kv_capacity_tokens} KV tokens = "
            f"{self.max_concurrent_seqs_full_context} sequences of {self.max_model_len} tokens or "
            f"{self.max_concurrent_seqs_typical} of {TYPICAL_REQUEST_TOKENS}. Why: {self.reason}"
        )

    def to_table(self) -> Any:  # -> rich.table.Table
        """One rich table: a row per candidate precision."""
        from rich.table import Table

        title = f"memory plan: {format_bytes(self.budget_bytes)} on {self.device} ({self.budget_source})"
        table = Table(title=title)
        for col in (
            "precision",
            "dtype",
            "weights",
            "KV/token",
            "overhead",
            "min total",
            "fits?",
            "KV tokens",
            f"seqs@{self.max_model_len}",
            f"seqs@{TYPICAL_REQUEST_TOKENS}",
        ):
            table.add_column(col, justify="right", no_wrap=True)
        for cand in self.candidates:
            chosen = self.precision is cand.precision
            table.add_row(
                f"{'> ' if chosen else ''}{cand.precision.value}",
                cand.dtype.value,
                format_bytes(cand.weights_bytes + cand.quant_state_bytes),
                f"{cand.kv_bytes_per_token} B",
                format_bytes(cand.overhead_bytes),
                format_bytes(cand.total_bytes),
                "yes" if cand.fits else f"no (-{format_bytes(cand.shortfall_bytes)})",
                str(cand.kv_capacity_tokens) if cand.fits else "-",
                str(cand.max_seqs(self.max_model_len)) if cand.fits else "-",
                str(cand.max_seqs(TYPICAL_REQUEST_TOKENS)) if cand.fits else "-",
            )
        return table

    def to_json(self) -> dict[str, Any]:
        """The `fitserve plan --json` object."""
        return {
            "model_path": self.model_path,
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "budget_source": self.budget_source,
            "chosen": self.precision.value if self.precision else None,
            "precision": self.precision.value if self.precision else None,
            "quant_backend": self.quant_backend.value if self.quant_backend else None,
            "reason": self.reason,
            "weights_bytes": self.weights_bytes,
            "quant_state_bytes": self.quant_state_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_dtype": self.kv_dtype,
            "overhead_bytes": self.overhead_bytes,
            "attention_scratch_bytes": self.attention_scratch_bytes,
            "total_bytes": self.total_bytes,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "kv_capacity_blocks": self.kv_capacity_blocks,
            "block_size_tokens": self.block_size_tokens,
            "spare_bytes": self.spare_bytes,
            "max_model_len": self.max_model_len,
            "min_concurrency": self.min_concurrency,
            "max_concurrent_seqs_full_context": self.max_concurrent_seqs_full_context,
            f"max_concurrent_seqs_{TYPICAL_REQUEST_TOKENS}": self.max_concurrent_seqs_typical,
            "device_map": self.device_map,
            "max_memory": {str(k): v for k, v in self.max_memory.items()} if self.max_memory else None,
            "device_split": [share.to_json() for share in self.device_split],
            "candidates": [c.to_json(self.max_model_len) for c in self.candidates],
        }


class NothingFitsError(Exception):
    """No precision fits the budget (or the forced one does not). `plan` has precision None and candidates."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


def _half_dtype(budget: Budget, probe: MemoryProbe) -> DType:
    if not budget.is_cuda:
        return DType.BFLOAT16
    indices = [int(d.device.split(":")[1]) for d in budget.devices]
    return DType.BFLOAT16 if all(probe.cuda_bf16_supported(i) for i in indices) else DType.FLOAT16


def _ladder(
    shape: ModelShape, request: PlanRequest, budget: Budget, probe: MemoryProbe, half: DType
) -> tuple[list[tuple[Precision, DType]], str]:
    """(precision, compute dtype) rungs, best first, and a note on why this ladder."""
    forced = request.precision if isinstance(request.precision, Precision) else None
    if shape.prequantized is not None:
        if forced is not None and forced is not shape.prequantized:
            raise PlanInputError(
                f"{shape.model_path} is a pre-quantized {shape.prequantized.value} checkpoint; "
                f"it can only be loaded as {shape.prequantized.value}, not {forced.value}"
            )
        return [(shape.prequantized, half)], f"pre-quantized {shape.prequantized.value} checkpoint, loaded as it is"
    if forced is Precision.GPTQ:
        raise PlanInputError(
            "fitserve loads GPTQ checkpoints but does not quantize to GPTQ: quantize the model "
            "with GPTQModel first, or choose int8/nf4"
        )
    if forced is Precision.BF16 and budget.is_cuda and half is DType.FLOAT16:
        logger.warning("bf16 asked for on a GPU without native bf16; it will be slow")
    requested = request.quant_backend if isinstance(request.quant_backend, KernelBackend) else None
    try:
        int8_backend = backend_for(Precision.INT8, on_cuda=budget.is_cuda, requested=requested)
        if forced is not None:
            backend_for(forced, on_cuda=budget.is_cuda, requested=requested)
    except ValueError as error:
        raise PlanInputError(str(error)) from None
    four_bit = four_bit_precision(int8_backend)
    if forced is not None:
        compute = {Precision.FP32: DType.FLOAT32, Precision.FP16: DType.FLOAT16, Precision.BF16: DType.BFLOAT16}
        return [(forced, compute.get(forced, half))], f"{forced.value} forced by --precision"
    if not budget.is_cuda and request.prefer_fp32_on_cpu and not probe.cpu_native_bf16():
        # the quantized rungs are for tight budgets: they keep bf16 dense layers and KV, so their minimums hold
        return (
            [
                (Precision.FP32, DType.FLOAT32),
                (Precision.BF16, DType.BFLOAT16),
                (Precision.INT8, DType.BFLOAT16),
                (four_bit, DType.BFLOAT16),
            ],
            "CPU without native bf16 (no AVX512-BF16/AMX): fp32 compute is faster here, so fp32 goes first "
            "when it fits (--no-prefer-fp32-on-cpu keeps bf16)",
        )
    sixteen = Precision.BF16 if half is DType.BFLOAT16 else Precision.FP16
    note = "bf16" if half is DType.BFLOAT16 else "fp16 (this GPU has no native bf16)"
    return [(sixteen, half), (Precision.INT8, half), (four_bit, half)], f"ladder {note} -> int8 -> {four_bit.value}"


def seq_tokens(request: PlanRequest) -> int:
    """KV tokens one full-length sequence occupies: max_model_len rounded up to whole blocks."""
    return math.ceil(request.max_model_len / request.block_size_tokens) * request.block_size_tokens


def kv_token_cap(request: PlanRequest) -> int:
    """Most KV tokens worth holding: max_num_seqs full sequences (or max_kv_tokens), in whole blocks."""
    useful = request.max_num_seqs * seq_tokens(request)
    capped = useful if request.max_kv_tokens is None else min(useful, request.max_kv_tokens)
    return align_down(capped, request.block_size_tokens)


def kv_capacity_tokens(left_bytes: int, kv_bytes_per_token: int, request: PlanRequest) -> int:
    """The one KV capacity formula: what `left_bytes` buys after the cache's scratch block, capped by
    `kv_token_cap`, in whole blocks."""
    slots = left_bytes // kv_bytes_per_token if kv_bytes_per_token else 0
    tokens = max(slots - kv_cache_tokens(0, request.block_size_tokens), 0)
    return align_down(min(tokens, kv_token_cap(request)), request.block_size_tokens)


def _split(
    est: PrecisionEstimate, budget: Budget, request: PlanRequest, num_layers: int
) -> tuple[int, tuple[DeviceShare, ...]]:
    """(KV capacity, per-device split) of one precision; (0, ()) when the weights do not fit."""
    weights = est.weights_bytes + est.quant_state_bytes
    if len(budget.devices) == 1:
        dev = budget.devices[0]
        capacity = kv_capacity_tokens(dev.budget_bytes - weights - est.overhead_bytes, est.kv_bytes_per_token, request)
        share = DeviceShare(
            dev.device,
            dev.budget_bytes,
            0,
            num_layers,
            weights,
            est.overhead_bytes,
            est.kv_bytes_per_token,
            capacity,
            request.block_size_tokens,
        )
        return capacity, (share,)
    costs = layer_costs(
        num_layers=num_layers,
        weights_bytes=weights,
        layer_weights_bytes=est.layer_weights_bytes,
        kv_bytes_per_token=est.kv_bytes_per_token,
        overhead_parts=est.overhead,
        num_devices=len(budget.devices),
    )
    devices = [(d.device, d.budget_bytes) for d in budget.devices]
    shares = split_layers(devices, costs, kv_token_cap(request), request.block_size_tokens)
    return (shares[0].kv_capacity_tokens, shares) if shares else (0, ())


def _evaluate(est: PrecisionEstimate, budget: Budget, request: PlanRequest, num_layers: int) -> Candidate:
    min_tokens = seq_tokens(request) * request.min_concurrency
    min_kv = est.kv_bytes_per_token * kv_cache_tokens(min_tokens, request.block_size_tokens)
    capacity, shares = _split(est, budget, request, num_layers)
    over = sum(s.overhead_bytes for s in shares) if len(shares) > 1 else est.overhead_bytes
    # on CPU loading peaks before the KV cache exists; the minimum is the larger of the load and the serving need
    total = max(est.weights_bytes + est.quant_state_bytes + over + min_kv, est.load_peak_bytes)
    fits = total <= budget.budget_bytes and capacity >= min_tokens
    return Candidate(
        est.precision,
        est.compute_dtype,
        est.weights_bytes,
        est.quant_state_bytes,
        est.kv_bytes_per_token,
        over,
        min_kv,
        total,
        fits,
        capacity if fits else 0,
        max(total - budget.budget_bytes, 0),
        shares if fits else (),
        est.load_peak_bytes,
        est.backend,
        est.overhead.attention_bytes,
    )


def _estimate(
    shape: ModelShape,
    precision: Precision,
    dtype: DType,
    request: PlanRequest,
    n_cuda: int,
    max_model_len: int | None = None,
) -> PrecisionEstimate:
    requested = request.quant_backend if isinstance(request.quant_backend, KernelBackend) else None
    return estimate_precision(
        shape,
        precision,
        dtype,
        max_batch_tokens=request.max_batch_tokens,
        max_num_seqs=request.max_num_seqs,
        max_model_len=max_model_len or request.max_model_len,
        n_cuda_devices=n_cuda,
        double_quant=request.double_quant,
        cpu_runtime_bytes=request.cpu_runtime_bytes,
        backend=backend_for(precision, on_cuda=n_cuda > 0, requested=requested),
    )


def _device_map(
    budget: Budget, shares: tuple[DeviceShare, ...], layers_module: str | None
) -> tuple[str | dict[str, Any], dict[int | str, int] | None]:
    """One device: its name. Several: each layer on its planned device (accelerate's "auto" with the planned
    per-device weights as `max_memory` when the layer list's name is unknown)."""
    if len(budget.devices) == 1:
        return budget.device, None
    max_memory: dict[int | str, int] = {}
    for share in shares:
        room = int(share.weights_bytes * MAX_MEMORY_HEADROOM)
        max_memory[int(share.device.split(":")[1])] = min(max(room, 1), share.budget_bytes)
    if layers_module is None:
        return "auto", max_memory
    return device_map_for(shares, layers_module), max_memory


def _largest_fitting_len(
    shape: ModelShape, precision: Precision, dtype: DType, request: PlanRequest, budget: Budget, n_cuda: int
) -> int:
    """The longest max_model_len at which `precision` fits (0 if none), by bisection."""
    lo, hi = 0, request.max_model_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = request.model_copy(update={"max_model_len": mid})
        if _evaluate(_estimate(shape, precision, dtype, trial, n_cuda, mid), budget, trial, shape.num_layers).fits:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _nothing_fits_message(
    shape: ModelShape, request: PlanRequest, budget: Budget, last: Candidate, n_cuda: int, forced: bool
) -> str:
    what = (
        f"the forced precision {last.precision.value}" if forced else f"the smallest precision, {last.precision.value},"
    )
    lines = [
        f"nothing fits: {what} needs {format_bytes(last.total_bytes)} ({last.total_bytes} bytes: weights "
        f"{format_bytes(last.weights_bytes + last.quant_state_bytes)} + overhead {format_bytes(last.overhead_bytes)}"
        f" + KV for {request.min_concurrency} x {request.max_model_len} tokens and a scratch block "
        f"{format_bytes(last.min_kv_bytes)}), "
        f"the budget on {budget.device} is {format_bytes(budget.budget_bytes)} ({budget.budget_bytes} bytes): "
        f"short by {format_bytes(last.shortfall_bytes)} ({last.shortfall_bytes} bytes).",
    ]
    if last.load_peak_bytes == last.total_bytes:
        lines[0] += f" Loading it peaks at {format_bytes(last.load_peak_bytes)} before the KV cache exists."
    lines.append("Things to change:")
    best_len = _largest_fitting_len(shape, last.precision, last.dtype, request, budget, n_cuda)
    if best_len > 0:
        lines.append(f"  - a smaller --max-model-len: {best_len} fits (or fewer --min-concurrency)")
    else:
        lines.append(
            "  - a smaller --max-model-len or --max-batch-tokens (the weights and overhead alone "
            f"need {format_bytes(last.total_bytes - last.min_kv_bytes)})"
        )
    lines.append(f"  - a bigger --memory-budget: at least {format_bytes(last.total_bytes)}")
    if forced:
        lines.append("  - another --precision (or auto), or --force to load it anyway")
    elif not budget.is_cuda:
        lines.append("  - a GPU: run where CUDA is available")
    else:
        lines.append("  - more or bigger GPUs")
    return "\n".join(lines)


def make_plan(
    request: PlanRequest,
    *,
    probe: MemoryProbe | None = None,
    shape: ModelShape | None = None,
    budget: Budget | None = None,
) -> Plan:
    """Choose the precision for `request`. Raises NothingFitsError, PlanInputError (bad input) or BudgetError.

    `probe`, `shape` and `budget` are injected by tests; by default the real machine and the model's
    meta-device skeleton are used.
    """
    probe = probe or SystemProbe()
    if shape is None:
        model = request.model
        if model is None:
            from fitserve.quant.model_store import resolve_model

            model = resolve_model(None)
        shape = inspect_model(model, trust_remote_code=request.trust_remote_code)
    if shape.max_position_embeddings and request.max_model_len > shape.max_position_embeddings:
        raise PlanInputError(
            f"--max-model-len {request.max_model_len} is more than the model's "
            f"max_position_embeddings {shape.max_position_embeddings}"
        )
    if request.max_num_seqs < request.min_concurrency:
        raise PlanInputError(
            f"max_num_seqs {request.max_num_seqs} is less than --min-concurrency {request.min_concurrency}"
        )
    if request.max_kv_tokens is not None and request.max_kv_tokens < request.max_model_len * request.min_concurrency:
        raise PlanInputError(
            f"max_kv_tokens {request.max_kv_tokens} cannot hold --min-concurrency "
            f"{request.min_concurrency} x --max-model-len {request.max_model_len} tokens"
        )
    budget = budget or detect_budget(request.device, request.memory_budget_bytes, probe=probe)
    n_cuda = len(budget.devices) if budget.is_cuda else 0
    half = _half_dtype(budget, probe)
    rungs, ladder_note = _ladder(shape, request, budget, probe, half)
    estimates = [_estimate(shape, p, d, request, n_cuda) for p, d in rungs]
    candidates = [_evaluate(est, budget, request, shape.num_layers) for est in estimates]
    forced = isinstance(request.precision, Precision)
    chosen = next((c for c in candidates if c.fits), None)
    if chosen is None and forced and request.force:
        capacity, shares = _split(estimates[0], budget, request, shape.num_layers)
        chosen = replace(candidates[0], device_split=shares)
        reason = (
            f"{chosen.precision.value} forced with --force although it is short by "
            f"{format_bytes(chosen.shortfall_bytes)}; KV capacity {capacity} tokens"
        )
        return _build_plan(shape, request, budget, chosen, candidates, reason, capacity)
    if chosen is None:
        last = candidates[-1]
        message = _nothing_fits_message(shape, request, budget, last, n_cuda, forced)
        empty = Plan(
            shape.model_path,
            None,
            budget.device,
            budget.budget_bytes,
            0,
            0,
            last.kv_bytes_per_token,
            last.dtype.value,
            0,
            0,
            0,
            request.max_model_len,
            request.min_concurrency,
            message,
            candidates,
            budget_source=budget.devices[0].source.value,
        )
        raise NothingFitsError(message, empty)
    skipped = [c for c in candidates if not c.fits and candidates.index(c) < candidates.index(chosen)]
    why = "; ".join(f"{c.precision.value} short by {format_bytes(c.shortfall_bytes)}" for c in skipped)
    reason = (
        f"{chosen.precision.value} fits in {format_bytes(budget.budget_bytes)} on {budget.device} with "
        f"{chosen.kv_capacity_tokens} KV tokens ({ladder_note}" + (f"; {why}" if why else "") + ")"
    )
    return _build_plan(shape, request, budget, chosen, candidates, reason, chosen.kv_capacity_tokens)


def _build_plan(
    shape: ModelShape,
    request: PlanRequest,
    budget: Budget,
    chosen: Candidate,
    candidates: list[Candidate],
    reason: str,
    capacity: int,
) -> Plan:
    device_map, max_memory = _device_map(budget, chosen.device_split, shape.layers_module)
    kv_cache = kv_cache_tokens(capacity, request.block_size_tokens) * chosen.kv_bytes_per_token
    total = chosen.weights_bytes + chosen.quant_state_bytes + chosen.overhead_bytes + kv_cache
    kernels = kernel_note(chosen.precision, chosen.backend)
    if kernels:
        reason = f"{reason}; {kernels}"
    plan = Plan(
        model_path=shape.model_path,
        precision=chosen.precision,
        device=budget.device,
        budget_bytes=budget.budget_bytes,
        weights_bytes=chosen.weights_bytes,
        quant_state_bytes=chosen.quant_state_bytes,
        kv_bytes_per_token=chosen.kv_bytes_per_token,
        kv_dtype=chosen.dtype.value,
        overhead_bytes=chosen.overhead_bytes,
        total_bytes=total,
        kv_capacity_tokens=capacity,
        max_model_len=request.max_model_len,
        min_concurrency=request.min_concurrency,
        reason=reason,
        candidates=candidates,
        device_map=device_map,
        max_memory=max_memory,
        double_quant=request.double_quant and chosen.precision is Precision.NF4,
        budget_source=budget.devices[0].source.value,
        prequantized=shape.prequantized is not None,
        block_size_tokens=request.block_size_tokens,
        spare_bytes=max(budget.budget_bytes - total, 0),
        device_split=chosen.device_split,
        quant_backend=chosen.backend,
        attention_scratch_bytes=chosen.attention_scratch_bytes,
    )
    logger.info("plan: %s", reason)
    return plan
