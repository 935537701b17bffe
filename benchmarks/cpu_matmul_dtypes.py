"""fp32 vs bf16 matmul time on this CPU for one decode/prefill step of the default model's Linears.

The planner puts fp32 above bf16 on CPUs without native bf16 (`quant/plan.py`, docs/memory-model.md section 6);
this is the measurement behind that choice. For each batch of M tokens it runs every Linear of a model with the
default model's shapes (30 layers x q/k/v/o/gate/up/down, plus the 49152-row lm_head), weights random, in
three ways: fp32 weights and activations; bf16 weights and activations (what a bf16 model does); bf16 weights
upcast to fp32 per call (half the bytes stored, fp32 arithmetic). Prints the median of `--repeats` and writes
JSON.

    .venv/bin/python benchmarks/cpu_matmul_dtypes.py --tokens 1,16,64,128 --out bench-out/cpu_matmul_dtypes.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, KV_DIM, VOCAB, LAYERS = 576, 1536, 192, 49152, 30
LAYER_SHAPES = [
    (HIDDEN, HIDDEN),
    (KV_DIM, HIDDEN),
    (KV_DIM, HIDDEN),
    (HIDDEN, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
]


def make_weights(num_layers: int) -> list[torch.Tensor]:
    """fp32 weights [out, in] of every Linear, lm_head last (more bytes than any cache holds)."""
    weights = [torch.randn(out, inp) * 0.02 for _ in range(num_layers) for out, inp in LAYER_SHAPES]
    return [*weights, torch.randn(VOCAB, HIDDEN) * 0.02]


def step_runner(weights: list[torch.Tensor], mode: str, tokens: int) -> Callable[[], None]:
    """A function running every Linear once on `tokens` rows in the given mode."""
    stored = weights if mode == "fp32" else [w.bfloat16() for w in weights]
    act_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    inputs = {n: torch.randn(tokens, n, dtype=act_dtype) for n in (HIDDEN, INTERMEDIATE)}

    def run() -> None:
        for w in stored:
            x = inputs[w.shape[1]]
            F.linear(x, w.float() if mode == "bf16-upcast" else w)

    return run


def median_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of `fn` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    """Run every (tokens, mode) pair; print a table; write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,64,128", help="rows per step (decode batch or prefill chunk)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--out", type=Path, default=Path("bench-out/cpu_matmul_dtypes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = make_weights(args.layers)
    rows = []
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, median of {args.repeats}")
    print(f"{'tokens':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16-upcast ms':>15} {'bf16/fp32':>10}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        row: dict[str, float | int] = {"tokens": tokens}
        for mode in ("fp32", "bf16", "bf16-upcast"):
            row[f"{mode}_ms"] = median_ms(step_runner(weights, mode, tokens), args.repeats)
        rows.append(row)
        print(
            f"{tokens:>6} {row['fp32_ms']:>9.1f} {row['bf16_ms']:>9.1f} {row['bf16-upcast_ms']:>15.1f} "
            f"{row['bf16_ms'] / row['fp32_ms']:>9.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "repeats": args.repeats,
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
