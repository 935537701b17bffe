"""How the engine runs its decode step: the `CompileMode` enum (no torch, so settings and config can name it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CompileMode(enum.StrEnum):
    """How decode-only steps run. `AUTO` resolves per device (`compiled_decode.resolve_mode`)."""

    AUTO = "auto"
    OFF = "off"  # the eager packed path (decodes batched per layer while their gather fits the plan)
    EAGER = "eager"  # the fixed-shape bucketed decode forward (one attention call per layer), not compiled
    INDUCTOR = "inductor"  # torch.compile: one graph for batch 1, one (dynamic batch) for the larger buckets
    CUDA_GRAPHS = "cuda-graphs"  # explicit CUDA graph capture per (batch, context) bucket (CUDA devices only)


# What `torch.compile` (inductor) keeps in a CPU serving process beyond eager serving (dynamo's and inductor's state,
# the compiled kernels): measured on the default model with its 7 batch buckets, +325 MiB resident after start-up and
# +395 MiB at the peak (docs/memory-model.md). On CPU the budget is the process's memory, so the plan counts this when
# the mode is INDUCTOR; on a GPU the compiled code lives in host memory, outside the budget.
INDUCTOR_CPU_RUNTIME_BYTES = 512 << 20


def compile_runtime_bytes(mode: CompileMode, on_cpu: bool) -> int:
    """Process memory the decode step's compilation adds on CPU, for the plan (0 for modes that compile nothing)."""
    return INDUCTOR_CPU_RUNTIME_BYTES if on_cpu and mode is CompileMode.INDUCTOR else 0


# AUTO on CPU compiles the decode step only where it was measured to pay and only within the plan's spare memory.
# Where: batch 1, where a step is mostly per-op overhead around matrix-vector products. With torch's weight-only
# INT8/INT4 kernels inductor fuses the ops around them (default model, 2-core VM, `benchmarks/decode_step.py
# --compile-modes off,inductor --precision P`, medians of 30 steps: INT4 23.7 -> 19.9 ms, INT8 26.9 -> 22.6 ms); with
# dense weights it also streams each weight through its own fused reduction (`quant.matvec.matvec`; `--dtype D
# --keep-dense-linears`: bf16 22.9 -> 13.9 ms, fp32 32.3 -> 18.7 ms; docs/benchmarks.md). Bigger batches stay
# eager: their Python overhead is shared by every row, and compiling them is a second graph (dynamic in the batch
# size) to build at start-up: `--compile-mode inductor` builds all 15 default buckets in 113 s cold / 16 s warm
# (bf16 batch 16 step 40.8 -> 27.6 ms, `CompiledDecode._compile`); AUTO has not been measured end to end with it.
CPU_AUTO_COMPILED_BATCH_SIZE = 1
# What compiling that one batch bucket keeps resident on CPU (dynamo's and inductor's state, the compiled kernels),
# counted in the plan's overhead when AUTO compiles. Measured on the default model in INT4 (cold compile cache,
# `benchmarks/serve_startup.py`): +135 MiB at /ready and +157 MiB at the peak over `--no-compile`; warm +78 / +102.
INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES = 192 << 20


class CpuLinearKernels(enum.StrEnum):
    """What runs a CPU plan's Linears, as far as AUTO's choice to compile the batch-1 decode step goes."""

    WEIGHT_ONLY = "weight-only"  # torch's INT8/INT4 weight-only ops: compiled as they are
    DENSE_PACKED = "dense-packed"  # oneDNN over prepacked fp32/bf16: compiled with `matvec` over the dense weights
    OTHER = "other"  # fp16, bitsandbytes, GPTQ: not compiled by AUTO


@dataclass(frozen=True)
class CompileChoice:
    """How the decode step will run, decided with the plan: the mode, its largest compiled batch bucket (None: the
    engine's batch cap), the process memory the plan must count for it, why, and whether a failed build may fall
    back to eager steps."""

    mode: CompileMode
    max_compiled_batch_size: int | None = None
    runtime_bytes: int = 0  # not yet in the plan: moved from its spare budget to its overhead
    reason: str = ""
    fallback_to_eager: bool = False  # a build failure at start-up runs steps eagerly instead (modes AUTO chose)
    dense_copy_bytes: int = 0  # of runtime_bytes: packed copies beside dense weights kept for `matvec`


def choose_cpu_compile(
    requested: CompileMode,
    kernels: CpuLinearKernels,
    spare_bytes: int,
    compiler_available: bool = True,
    dense_weight_bytes: int = 0,
) -> CompileChoice:
    """The decode-step mode on CPU for a plan: `requested` unless it is AUTO; AUTO compiles batch-1 decode steps
    (inductor) for the `kernels` it was measured faster with, when inductor has a C++ compiler and the plan's spare
    bytes hold what compiling keeps (for `DENSE_PACKED`, also a packed copy of the `dense_weight_bytes` of weights,
    whose dense originals the compiled step reads), else it stays OFF. `spare_bytes` is the budget the plan leaves
    after everything else. AUTO's choice falls back to eager if the build fails at start-up anyway
    (`fallback_to_eager`). `runtime_bytes` is what the plan has yet to count: an explicit mode's bytes were planned
    before the precision was chosen (`compile_runtime_bytes`), so its choice carries none."""
    if requested is not CompileMode.AUTO:
        return CompileChoice(requested)
    if kernels is CpuLinearKernels.OTHER:
        return CompileChoice(
            CompileMode.OFF,
            reason="decode step eager (on CPU only torch's int8/int4 kernels and oneDNN's fp32/bf16 ones are compiled)",
        )
    if not compiler_available:
        return CompileChoice(CompileMode.OFF, reason="decode step eager (no C++ compiler for torch.compile)")
    copy_bytes = dense_weight_bytes if kernels is CpuLinearKernels.DENSE_PACKED else 0
    need = INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES + copy_bytes
    if spare_bytes < need:
        return CompileChoice(
            CompileMode.OFF,
            reason=f"decode step eager (compiling needs {need >> 20} MiB, the budget has {spare_bytes >> 20} MiB "
            "spare)",
        )
    kept = f" + {copy_bytes >> 20} MiB to keep the dense weights beside the packed ones" if copy_bytes else ""
    return CompileChoice(
        CompileMode.INDUCTOR,
        max_compiled_batch_size=CPU_AUTO_COMPILED_BATCH_SIZE,
        runtime_bytes=need,
        fallback_to_eager=True,
        dense_copy_bytes=copy_bytes,
        reason=(
            f"decode steps of {CPU_AUTO_COMPILED_BATCH_SIZE} sequence compiled (inductor; "
            f"{INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES >> 20} MiB{kept} of the spare budget)"
        ),
    )
