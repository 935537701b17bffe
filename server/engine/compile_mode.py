"""How the engine runs its decode step: the `CompileMode` enum (no torch, so settings and config can name it)."""

from __future__ import annotations

import enum


class CompileMode(enum.StrEnum):
    """How decode-only steps run. `AUTO` resolves per device (`compiled_decode.resolve_mode`)."""

    AUTO = "auto"
    OFF = "off"  # eager, per-sequence attention (bit-exact with a lone `model.generate`)
    EAGER = "eager"  # the fixed-shape bucketed decode forward (one attention call per layer), not compiled
    INDUCTOR = "inductor"  # torch.compile, one graph per batch-size bucket
    CUDA_GRAPHS = "cuda-graphs"  # explicit CUDA graph capture per (batch, context) bucket (CUDA devices only)
