"""Batched decode attention over the paged cache, compiled: one SDPA call per layer vs the fused reductions.

Every layer of the default model's shape (SmolLM2-135M: 9 query heads, 3 KV heads, head dim 64; `--layers` of
them, each with its own K/V cache) attends `--batch-sizes` x `--context-blocks` decodes through padded block tables,
inside one `torch.compile`d function per variant, as the compiled decode step does:

- `sdpa`: gather K/V through the block tables, then `F.scaled_dot_product_attention` with a mask (the eager path);
- `reduced`: `kv_cache._reduced_decode_attention` (what a compiled step runs: two multiply-and-sum reductions
  around a softmax, which inductor fuses with the gather).

The variants alternate `--rounds` times; prints the median time per call of all layers and writes JSON. Run it with
nothing else on the machine. Not a timed test.

    .venv/bin/python benchmarks/attention_decode.py --batch-sizes 1,16 --context-blocks 8,32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from fitserve.server.engine.kv_cache import _paged_context, _reduced_decode_attention  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--context-blocks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--cache-blocks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="calls per timing")
    parser.add_argument("--out", type=Path, default=Path("bench-out/attention_decode.json"))
    return parser.parse_args()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One masked SDPA call (the eager path's attention)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.view(mask.shape[0], 1, 1, -1), scale=scale)


def all_layers(attention: Attention, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[..., torch.Tensor]:
    """Every layer's attention for the same decodes, as one function to compile."""

    def run(queries: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        outs = []
        for layer, (k_cache, v_cache) in enumerate(caches):
            k = _paged_context(k_cache, block_tables, BLOCK)
            v = _paged_context(v_cache, block_tables, BLOCK)
            mask = torch.arange(k.shape[2]).unsqueeze(0) < context_lens.unsqueeze(1)
            outs.append(attention(queries[layer], k, v, mask, HEAD_DIM**-0.5))
        return torch.stack(outs)

    return run


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    slots = (args.cache_blocks + 1) * BLOCK
    caches = [
        (
            torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(dtype),
            torch.randn(slots, KV_HEADS, HEAD_DIM, generator=gen).to(dtype),
        )
        for _ in range(args.layers)
    ]
    variants: dict[str, Attention] = {"sdpa": sdpa, "reduced": _reduced_decode_attention}
    results = []
    for batch in args.batch_sizes:
        for blocks in args.context_blocks:
            queries = torch.randn(args.layers, batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
            block_tables = torch.randint(0, args.cache_blocks, (batch, blocks), generator=gen)
            context_lens = torch.full((batch,), blocks * BLOCK - 5)
            compiled = {name: torch.compile(all_layers(fn, caches), dynamic=False) for name, fn in variants.items()}
            times: dict[str, list[float]] = {name: [] for name in variants}
            with torch.inference_mode():
                outputs = {name: fn(queries, block_tables, context_lens) for name, fn in compiled.items()}
                for _ in range(args.rounds):
                    for name, fn in compiled.items():
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            fn(queries, block_tables, context_lens)
                        times[name].append((time.perf_counter() - start) / args.calls * 1e3)
            max_diff = (outputs["sdpa"].float() - outputs["reduced"].float()).abs().max().item()
            medians = {name: statistics.median(ts) for name, ts in times.items()}
            row = {
                "batch": batch,
                "context_tokens": blocks * BLOCK,
                "median_ms": medians,
                "times_ms": times,
                "max_abs_diff": max_diff,
                "ratio_reduced_to_sdpa": medians["reduced"] / medians["sdpa"],
            }
            results.append(row)
            print(
                f"batch {batch:2d} context {blocks * BLOCK:4d}: sdpa {medians['sdpa']:.3f} ms, reduced "
                f"{medians['reduced']:.3f} ms ({row['ratio_reduced_to_sdpa']:.2f}x), max |diff| {max_diff:.2g}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "layers": args.layers,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
