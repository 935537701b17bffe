"""Load the planned model: the only place in fitserve that calls `from_pretrained`.

Returns the model, its tokenizer and a `LoadReport` that compares the plan's predicted weight bytes with
what the loaded model really holds (`get_memory_footprint()`, plus bitsandbytes' scales kept outside
parameters), and device memory before and after.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fitserve.quant.budget import DeviceMemory, format_bytes, read_device_memory
from fitserve.quant.estimate import linear_conversion_rule
from fitserve.quant.heap import trim_free_heap, trimming_free_heap
from fitserve.quant.mapped_files import in_ranges, mapped_file_ranges
from fitserve.quant.plan import Plan
from fitserve.quant.schemes import KernelBackend, Precision, SchemeHandler, handler_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """How right the plan was about the weights, and what loading cost."""

    precision: Precision
    device: str
    predicted_weights_bytes: int
    measured_weights_bytes: int  # model.get_memory_footprint(): parameters + buffers
    predicted_quant_state_bytes: int
    measured_quant_state_bytes: int  # bitsandbytes scales outside parameters (SCB, absmax, code books)
    memory_before: DeviceMemory
    memory_after: DeviceMemory
    load_time_s: float
    measured_weights_by_device: dict[str, int] = field(default_factory=dict)  # parameters + buffers per device

    @property
    def weights_error_ratio(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_weights_bytes - self.measured_weights_bytes) / max(self.measured_weights_bytes, 1)

    def to_log_line(self) -> str:
        """One line for the server log."""
        line = (
            f"loaded {self.precision.value} on {self.device} in {self.load_time_s:.2f}s: weights predicted "
            f"{format_bytes(self.predicted_weights_bytes)} measured {format_bytes(self.measured_weights_bytes)} "
            f"({self.weights_error_ratio:+.2%}); quant state predicted "
            f"{format_bytes(self.predicted_quant_state_bytes)} measured "
            f"{format_bytes(self.measured_quant_state_bytes)}; {self._memory_label()} "
            f"{format_bytes(self.memory_before.used_bytes)} -> {format_bytes(self.memory_after.used_bytes)}"
        )
        if self.memory_after.torch_allocated_bytes is not None:
            line += (
                f"; torch allocated {format_bytes(self.memory_after.torch_allocated_bytes)}, reserved "
                f"{format_bytes(self.memory_after.torch_reserved_bytes or 0)}"
            )
        return line

    def _memory_label(self) -> str:
        return "process RSS" if self.device == "cpu" else "device used"

    def to_table(self) -> Any:  # -> rich.table.Table
        """A rich table of the same figures."""
        from rich.table import Table

        table = Table(title=f"load report: {self.precision.value} on {self.device}")
        for col in ("", "predicted", "measured", "error"):
            table.add_column(col, justify="right")
        table.add_row(
            "weights",
            format_bytes(self.predicted_weights_bytes),
            format_bytes(self.measured_weights_bytes),
            f"{self.weights_error_ratio:+.2%}",
        )
        table.add_row(
            "quant state",
            format_bytes(self.predicted_quant_state_bytes),
            format_bytes(self.measured_quant_state_bytes),
            "",
        )
        table.add_row(
            f"{self._memory_label()} before/after",
            format_bytes(self.memory_before.used_bytes),
            format_bytes(self.memory_after.used_bytes),
            "",
        )
        table.add_row("load time", "", f"{self.load_time_s:.2f} s", "")
        return table

    def to_json(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {
            "precision": self.precision.value,
            "device": self.device,
            "predicted_weights_bytes": self.predicted_weights_bytes,
            "measured_weights_bytes": self.measured_weights_bytes,
            "weights_error_ratio": self.weights_error_ratio,
            "predicted_quant_state_bytes": self.predicted_quant_state_bytes,
            "measured_quant_state_bytes": self.measured_quant_state_bytes,
            "memory_before_used_bytes": self.memory_before.used_bytes,
            "memory_after_used_bytes": self.memory_after.used_bytes,
            "torch_allocated_bytes": self.memory_after.torch_allocated_bytes,
            "torch_reserved_bytes": self.memory_after.torch_reserved_bytes,
            "load_time_s": self.load_time_s,
        }


@dataclass
class LoadedModel:
    """What the server starts from."""

    model: Any  # transformers PreTrainedModel, in eval mode
    tokenizer: Any
    report: LoadReport


def measure_quant_state_bytes(model: Any) -> int:
    """Bytes of bitsandbytes quantization state held outside parameters and buffers.

    INT8: each `Int8Params` keeps its per-row scales in `.SCB`. NF4: each `Params4bit` keeps a `quant_state`
    with absmax, code book and, with double quantization, the nested absmax and code book.
    """
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for param in model.parameters():
        add(getattr(param, "SCB", None))
        state = getattr(param, "quant_state", None)
        if state is None:
            continue
        add(getattr(state, "absmax", None))
        add(getattr(state, "code", None))
        nested = getattr(state, "state2", None)
        if nested is not None:
            add(getattr(nested, "absmax", None))
            add(getattr(nested, "code", None))
    return total


def measure_weights_by_device(model: Any) -> dict[str, int]:
    """Bytes of parameters and buffers per device ("cpu", "cuda:0", ...), tied tensors counted once."""
    seen: set[int] = set()
    out: dict[str, int] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        name = str(tensor.device)
        out[name] = out.get(name, 0) + tensor.numel() * tensor.element_size()
    return out


def _handler(plan: Plan) -> SchemeHandler:
    return handler_for(plan.precision or Precision.BF16, double_quant=plan.double_quant, backend=plan.quant_backend)


def _load_kwargs(plan: Plan) -> dict[str, Any]:
    kwargs = _handler(plan).load_kwargs(plan.compute_dtype)
    if plan.prequantized:
        kwargs.pop("quantization_config", None)  # the checkpoint's own config drives the load
    kwargs["device_map"] = plan.device_map or plan.device
    if plan.max_memory:
        kwargs["max_memory"] = plan.max_memory
    return kwargs


class _OnceFilter(logging.Filter):
    """Let a log message that starts with `prefix` through once, then drop its repeats."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs "inputs will be cast ... to float16" on every INT8 matmul with bf16/fp32 inputs
    (hundreds of lines per forward pass); keep the first one only."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def measure_cpu_runtime_bytes() -> int:
    """This process's RSS once torch and transformers are imported: what serving holds before loading a weight.

    `fitserve serve` plans with this instead of the `CPU_RUNTIME_BYTES` estimate (it imports both anyway).
    """
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fitserve.quant.budget import process_rss_bytes

    release_free_heap()
    return process_rss_bytes()


def release_free_heap() -> None:
    """Give glibc's freed heap back to the OS after a CPU load (and, in `fitserve serve`, after the engine's
    weight prepacking replaced the loaded fp32 weights).

    bitsandbytes quantizes from 16-bit copies on CPU; once freed they stay in malloc's arenas and inflate RSS
    (default model, INT8: RSS +679 MiB after load, +467 MiB after trimming, of which ~300 MiB is shared,
    reclaimable file pages). A no-op where glibc is absent.
    """
    import gc

    gc.collect()
    trim_free_heap()


def release_checkpoint_pages(model: Any) -> int:
    """Copy the few tensors that still view the memory-mapped checkpoint into their own memory, so the mapping
    (whose every page the load touched) is dropped; returns the bytes copied.

    After an INT8/NF4 (or fp32-from-bf16) load only the dense tensors kept in the checkpoint's dtype
    (embeddings, norms) still view the file, but they pin the whole mapping: on the default model 202 MiB of
    file pages stay resident for 56 MiB of tensors. When most of the mapping is the weights themselves (a
    16-bit model served as stored), nothing is copied.
    """
    ranges = mapped_file_ranges()
    if not ranges:
        return 0
    mapped = sum(end - start for start, end in ranges)
    viewing = [t for t in (*model.parameters(), *model.buffers()) if in_ranges(t.data_ptr(), ranges)]
    viewed = sum(t.numel() * t.element_size() for t in viewing)
    if not viewing or viewed * 2 > mapped:
        return 0
    for tensor in viewing:
        tensor.data = tensor.data.clone()
    return viewed


def load_model(plan: Plan, trust_remote_code: bool = False) -> LoadedModel:
    """Load `plan.model_path` in `plan.precision` on the planned device(s) and measure it.

    `trust_remote_code` lets the model repository's own code run; off unless the user asked for it.
    """
    if plan.precision is None:
        raise ValueError("this plan chose no precision (nothing fits); nothing to load")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = _load_kwargs(plan)
    if plan.precision is Precision.INT8 and plan.quant_backend is not KernelBackend.TORCH:
        _quiet_int8_cast_warning()
    before = read_device_memory(plan.device)
    start = time.perf_counter()
    with trimming_free_heap() if plan.device == "cpu" else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(plan.model_path, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    converted = _handler(plan).convert_loaded(model, linear_conversion_rule(model), plan.compute_dtype)
    if converted:
        logger.info("%s", converted)
    tokenizer = AutoTokenizer.from_pretrained(plan.model_path, trust_remote_code=trust_remote_code)
    elapsed = time.perf_counter() - start
    if plan.device == "cpu":
        copied = release_checkpoint_pages(model)
        if copied:
            logger.info("copied %s of tensors out of the checkpoint's mapping to release it", format_bytes(copied))
        release_free_heap()
    after = read_device_memory(plan.device)
    report = LoadReport(
        precision=plan.precision,
        device=plan.device,
        predicted_weights_bytes=plan.weights_bytes,
        measured_weights_bytes=int(model.get_memory_footprint()),
        predicted_quant_state_bytes=plan.quant_state_bytes,
        measured_quant_state_bytes=measure_quant_state_bytes(model),
        memory_before=before,
        memory_after=after,
        load_time_s=elapsed,
        measured_weights_by_device=measure_weights_by_device(model),
    )
    logger.info("%s", report.to_log_line())
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)
