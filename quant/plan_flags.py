"""The planning flags `fitserve plan` and `fitserve serve` share, declared once.

`plan` gives every flag its default; `serve` adds them without defaults (`argparse.SUPPRESS`), so a flag left
out stays absent and the `FITSERVE_*` environment or the settings' default applies instead.
"""

from __future__ import annotations

import argparse
from typing import Any

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "int8", "int4", "nf4", "gptq")
QUANT_BACKEND_CHOICES = ("auto", "torch", "bitsandbytes")

PLAN_FLAG_DEFAULTS: dict[str, Any] = {
    "model": None,
    "memory_budget": None,
    "max_model_len": 2048,
    "min_concurrency": 1,
    "max_kv_tokens": None,
    "precision": "auto",
    "force": False,
    "quant_backend": "auto",
    "prefer_fp32_on_cpu": True,
    "trust_remote_code": False,
}


def add_plan_flags(parser: argparse._ActionsContainer, *, with_defaults: bool) -> None:
    """Add the shared planning flags to `parser` (or an argument group); `with_defaults=False` for `serve`."""

    def default(dest: str) -> dict[str, Any]:
        return {"default": PLAN_FLAG_DEFAULTS[dest]} if with_defaults else {}

    parser.add_argument(
        "--model",
        help="local model directory, .gguf file (converted once into the cache) or hub id (default: the default)",
        **default("model"),
    )
    parser.add_argument(
        "--memory-budget",
        help="memory budget, e.g. 24GiB, 24GB, 512MiB, 0.5GiB or bytes (default: what the device has free)",
        **default("memory_budget"),
    )
    parser.add_argument(
        "--max-model-len", type=int, help="context length in tokens (default 2048)", **default("max_model_len")
    )
    parser.add_argument(
        "--min-concurrency",
        type=int,
        help="full-length sequences the KV cache must hold at least (default 1)",
        **default("min_concurrency"),
    )
    parser.add_argument(
        "--max-kv-tokens",
        type=int,
        help="cap the KV cache (default: all the budget leaves)",
        **default("max_kv_tokens"),
    )
    parser.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        help="weight precision (default: auto, the best that fits)",
        **default("precision"),
    )
    parser.add_argument(
        "--force", action="store_true", help="with --precision: use it even if it does not fit", **default("force")
    )
    parser.add_argument(
        "--quant-backend",
        choices=QUANT_BACKEND_CHOICES,
        help="kernels for int8 and the 4-bit rung: auto = torch's weight-only kernels on CPU (int8, int4), "
        "bitsandbytes on GPU (int8, nf4); bitsandbytes keeps LLM.int8/nf4 on CPU too",
        **default("quant_backend"),
    )
    parser.add_argument(
        "--prefer-fp32-on-cpu",
        action=argparse.BooleanOptionalAction,
        help="on CPUs without native bf16 (AVX2 only) try fp32 first: faster there, twice the memory "
        "(default: on; see docs/memory-model.md)",
        **default("prefer_fp32_on_cpu"),
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model repository to run its own code",
        **default("trust_remote_code"),
    )
