"""How the engine runs its decode step: the `CompileMode` enum (no torch, so settings and config can name it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CompileMode(enum.StrEnum):
    """How decode-only steps run. `AUTO` resolves per device (`compiled_decode.resolve_mode`)."""

    AUTO = "auto"
    OFF = "off"  # the eager packed path (decodes batched per layer while their gather fits the plan)
    EAGER = "eager"  # the fixed-shape bucketed decode forward (one attention call per layer), not compiled
    INDUCTOR = "inductor"  # torch.compile, one graph per batch-size bucket
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
# Where: torch's weight-only INT8/INT4 kernels at batch 1, where a step is mostly per-op overhead around small
# matmuls (default model, 2-core VM, `benchmarks/decode_step.py --compile-modes off,inductor --precision P`, medians of
# 30 steps: INT4 23.7 -> 19.9 ms, INT8 26.9 -> 22.6 ms; docs/benchmarks.md). Bigger batches stay eager (their
# Python overhead is shared by every row, and each batch bucket is one more ~30 s compile at the first start).
CPU_AUTO_COMPILED_BATCH_SIZE = 1
# What compiling that one batch bucket keeps resident on CPU (dynamo's and inductor's state, the compiled kernels),
# counted in the plan's overhead when AUTO compiles. Measured on the default model in INT4 (cold compile cache,
# `benchmarks/serve_startup.py`): +135 MiB at /ready and +157 MiB at the peak over `--no-compile`; warm +78 / +102.
INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES = 192 << 20


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


def choose_cpu_compile(
    requested: CompileMode, torch_weight_only: bool, spare_bytes: int, compiler_available: bool = True
) -> CompileChoice:
    """The decode-step mode on CPU for a plan: `requested` unless it is AUTO; AUTO compiles batch-1 decode steps
    (inductor) when the weights run on torch's weight-only kernels, inductor has a C++ compiler and the plan's spare
    bytes hold what compiling keeps, else it stays OFF. `spare_bytes` is the budget the plan leaves after everything
    else. AUTO's choice falls back to eager if the build fails at start-up anyway (`fallback_to_eager`).
    `runtime_bytes` is what the plan has yet to count: an explicit mode's bytes were planned before the precision was
    chosen (`compile_runtime_bytes`), so its choice carries none."""
    if requested is not CompileMode.AUTO:
        return CompileChoice(requested)
    if torch_weight_only and not compiler_available:
        return CompileChoice(CompileMode.OFF, reason="decode step eager (no C++ compiler for torch.compile)")
    if not torch_weight_only:
        return CompileChoice(
            CompileMode.OFF, reason="decode step eager (on CPU only torch's int8/int4 kernels are compiled)"
        )
    if spare_bytes < INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES:
        need, have = INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES >> 20, spare_bytes >> 20
        return CompileChoice(
            CompileMode.OFF, reason=f"decode step eager (compiling needs {need} MiB, the budget has {have} MiB spare)"
        )
    return CompileChoice(
        CompileMode.INDUCTOR,
        max_compiled_batch_size=CPU_AUTO_COMPILED_BATCH_SIZE,
        runtime_bytes=INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES,
        fallback_to_eager=True,
        reason=(
            f"decode steps of {CPU_AUTO_COMPILED_BATCH_SIZE} sequence compiled (inductor; "
            f"{INDUCTOR_CPU_ONE_BUCKET_RUNTIME_BYTES >> 20} MiB of the spare budget)"
        ),
    )
