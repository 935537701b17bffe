"""What the prefix-cache block keys cost: SHA-256 chained keys (now) vs Python's `hash()` of token tuples (before).

The block pool computes one key per full block it looks up at admission (`BlockPool.match`) and per block that
becomes full (`BlockPool.register`). This measures, side by side in one run (alternating, median of `--repeats`):

* ns per block key, for `--block-size`-token blocks;
* the key cost of typical steps: a prefill of `--prefill-tokens` tokens (match + register every block), and a
  decode step of `--decode-seqs` sequences (on average `decode_seqs / block_size` blocks become full per step);
* the same through the real `BlockPool` (match + register of a prefill-sized prompt).

    .venv/bin/python benchmarks/prefix_hash_cost.py --out bench-out/prefix_hash_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fitserve.server.engine.block_pool import ROOT_KEY, BlockPool, block_key


def python_hash_key(parent: int, token_ids: Sequence[int]) -> int:
    """The key the block pool used before: `hash((parent hash, token tuple))`."""
    return hash((parent, tuple(token_ids)))


def chain_sha256(blocks: list[list[int]]) -> bytes:
    """Keys of consecutive blocks with SHA-256 (as `BlockPool` does now)."""
    key = ROOT_KEY
    for tokens in blocks:
        key = block_key(key, tokens)
    return key


def chain_hash(blocks: list[list[int]]) -> int:
    """Keys of consecutive blocks with `hash()` (as before)."""
    key = 0
    for tokens in blocks:
        key = python_hash_key(key, tokens)
    return key


def pool_round_trip(tokens: list[int], block_size: int) -> None:
    """Admission lookup and registration of one prompt through a fresh `BlockPool`."""
    num_blocks = len(tokens) // block_size
    pool = BlockPool(num_blocks + 1, block_size)
    hit = pool.match(tokens, num_blocks)
    table = pool.allocate(hit, num_blocks)
    pool.register(table, tokens, 0, num_blocks, hit.last_key)


def median_ns(fn: Callable[[], object], inner: int, repeats: int) -> list[float]:
    """Per-call nanoseconds of `fn`, one sample per repeat (each the mean of `inner` calls)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter_ns() - t0) / inner)
    return samples


def main() -> None:
    """Measure and print; write JSON to --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-seqs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench-out/prefix_hash_cost.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    bs = args.block_size
    blocks = [[rng.randrange(49152) for _ in range(bs)] for _ in range(args.prefill_tokens // bs)]
    prompt = [t for block in blocks for t in block]
    one = blocks[0]
    cases: dict[str, tuple[Callable[[], object], Callable[[], object], int]] = {
        "one_block": (lambda: block_key(ROOT_KEY, one), lambda: python_hash_key(0, one), 2000),
        "prefill_chain": (lambda: chain_sha256(blocks), lambda: chain_hash(blocks), 50),
    }
    samples: dict[str, dict[str, list[float]]] = {name: {"sha256": [], "hash": []} for name in cases}
    for _ in range(args.repeats):  # alternate so that load from other processes hits both alike
        for name, (new, old, inner) in cases.items():
            samples[name]["sha256"] += median_ns(new, inner, 1)
            samples[name]["hash"] += median_ns(old, inner, 1)
    pool_samples = median_ns(lambda: pool_round_trip(prompt, bs), 20, args.repeats)

    med = {name: {k: statistics.median(v) for k, v in by.items()} for name, by in samples.items()}
    per_block = med["one_block"]
    prefill_blocks = len(blocks)
    decode_blocks = args.decode_seqs / bs  # blocks that become full per decode step, on average
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "shared": True},
        "block_size": bs,
        "ns_per_block": per_block,
        "ratio_sha256_over_hash": per_block["sha256"] / per_block["hash"],
        "prefill_step": {
            "tokens": args.prefill_tokens,
            "blocks_keyed": 2 * prefill_blocks,  # match at admission + register once computed
            "us_sha256": 2 * med["prefill_chain"]["sha256"] / 1e3,
            "us_hash": 2 * med["prefill_chain"]["hash"] / 1e3,
        },
        "decode_step": {
            "sequences": args.decode_seqs,
            "blocks_keyed_mean": decode_blocks,
            "ns_sha256": decode_blocks * per_block["sha256"],
            "ns_hash": decode_blocks * per_block["hash"],
        },
        "block_pool_match_register_prefill_us": statistics.median(pool_samples) / 1e3,
        "repeats": args.repeats,
    }
    print(f"per block ({bs} tokens): sha256 {per_block['sha256']:.0f} ns, hash() {per_block['hash']:.0f} ns")
    p = result["prefill_step"]
    print(
        f"prefill step of {args.prefill_tokens} tokens ({p['blocks_keyed']} keys): "  # type: ignore[index]
        f"sha256 {p['us_sha256']:.1f} us, hash() {p['us_hash']:.1f} us"  # type: ignore[index]
    )
    d = result["decode_step"]
    print(
        f"decode step of {args.decode_seqs} sequences (~{decode_blocks:.2f} keys): "
        f"sha256 {d['ns_sha256']:.0f} ns, hash() {d['ns_hash']:.0f} ns"  # type: ignore[index]
    )
    print(f"BlockPool match + register of the prefill prompt: {result['block_pool_match_register_prefill_us']:.1f} us")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
