"""How the engine runs its decode step: the `CompileMode` enum (no torch, so settings and config can name it)."""

from __future__ import annotations

import enum


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
