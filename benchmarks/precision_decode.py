"""Engine decode speed per precision, side by side, against this machine's memory-bandwidth roofline.

Loads the default model once per precision (fp32, bf16, int8, int4 by default: on CPU int8/int4 run on torch's
weight-only kernels, `quant/weight_only.py`), then, for `--repeats` rounds, runs every (precision, batch size)
pair through a fresh engine in turn (alternating, so a busy machine slows all of them alike) and keeps the median
output tok/s. Each engine decodes as `fitserve serve --precision P` does by default (`--compile auto`: the decode
step AUTO compiles for that precision's kernels, dense weights kept beside oneDNN's packed ones for fp32/bf16), or
eagerly (`--compile off`). Memory bandwidth is measured STREAM-like (copy and scale over `--stream-mib` MiB arrays,
bytes read + written) and read-only (a sum over the same array, bytes read), best and median of 5, before and after
the runs; the batch-1 roofline of a precision is the best copy bandwidth / the weight bytes one decode step reads
(its measured footprint: every weight is read once per step, the tied embedding through the lm_head), and the
read-only bound is the same with the best sum bandwidth.

    .venv/bin/python benchmarks/precision_decode.py --batch-sizes 1,4,16 --repeats 3 \
        --out bench-out/precision_decode.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_throughput import bench_engine  # a sibling script, not a package

logger = logging.getLogger("precision_decode")


def stream_bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """STREAM-like copy (b = a) and scale (b = 3 a) over fp32 arrays of `mib` MiB, bytes read + written per s; and
    read (a.sum()), bytes read per s: what a decode step, which only reads its weights, can reach at best."""
    import torch

    a = torch.rand(mib * 2**20 // 4)
    b = torch.empty_like(a)
    size = a.numel() * 4
    out: dict[str, float] = {}
    tests = (("copy", lambda: b.copy_(a), 2 * size), ("scale", lambda: torch.mul(a, 3.0, out=b), 2 * size))
    for name, fn, moved in (*tests, ("read", a.sum, size)):
        fn()
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            rates.append(moved / (time.perf_counter() - t))
        out[f"{name}_best_gb_s"] = max(rates) / 1e9
        out[f"{name}_median_gb_s"] = statistics.median(rates) / 1e9
    return out


def plan_for(model_dir: Path, precision: str, quant_backend: str) -> Any:
    """The plan `fitserve serve --precision P` makes on CPU (a generous 4 GiB budget)."""
    from fitserve.quant.plan import PlanRequest, make_plan

    return make_plan(
        PlanRequest(
            model=model_dir, memory_budget_bytes=4 << 30, precision=precision, device="cpu", quant_backend=quant_backend
        )
    )


def load(model_dir: Path, precision: str, quant_backend: str) -> Any:
    """The model loaded as `fitserve serve --precision P` would load it (a generous 4 GiB plan)."""
    from fitserve.quant.load import load_model

    return load_model(plan_for(model_dir, precision, quant_backend))


def engine_overrides(plan: Any, compile_setting: str) -> dict[str, Any]:
    """The `EngineConfig` fields `fitserve serve` derives from `plan`'s compile choice with the default `--compile-mode
    auto` (none for `off`), with the packer's allowance for the copies that choice keeps."""
    from fitserve.server.engine.compile_mode import CompileMode
    from fitserve.server.serve import compile_config_fields, decode_compile_choice

    if compile_setting == "off":
        return {}
    choice = decode_compile_choice(plan, CompileMode.AUTO)
    return compile_config_fields(choice) | {"spare_bytes": choice.dense_copy_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--quant-backend", default="auto", choices=("auto", "torch", "bitsandbytes"))
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stream-mib", type=int, default=256)
    parser.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "off"),
        help="auto: each precision's decode step as `fitserve serve` compiles it by default; off: eager steps",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/precision_decode.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from fitserve.quant.load import load_model
    from fitserve.quant.model_store import fetch_default_model
    from fitserve.server.serve import run_in_short_lived_thread

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or fetch_default_model()
    # every torch op runs in a thread that exits when done: a thread that ran one parallel op and lives on (this
    # one, through the engines' runs) makes GNU OpenMP stop spinning in the engine threads' regions, which halved
    # the compiled bf16 step here (11.3 -> 22.7 ms; docs/engine.md, "Only the engine thread runs torch")
    bandwidth_before = asyncio.run(run_in_short_lived_thread(stream_bandwidth, args.stream_mib))
    logger.info("memory bandwidth: %s", ", ".join(f"{k} {v:.1f}" for k, v in bandwidth_before.items()))
    precisions = args.precisions.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    plans = {p: plan_for(model_dir, p, args.quant_backend) for p in precisions}
    loaded = {p: asyncio.run(run_in_short_lived_thread(load_model, plans[p])) for p in precisions}
    engine_options = {p: engine_overrides(plans[p], args.compile) for p in precisions}
    for p, lm in loaded.items():  # warm-up: first forward, prepacking, compiling
        logger.info("%s: %s", p, engine_options[p] or "eager decode steps")
        bench_engine(lm.model, lm.tokenizer, 1, args.prompt_tokens, 4, config_overrides=engine_options[p])
    runs: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in precisions}
    decode_runs: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in precisions}
    for r in range(args.repeats):
        for b in batches:
            for p in precisions:
                lm = loaded[p]
                res = bench_engine(
                    lm.model, lm.tokenizer, b, args.prompt_tokens, args.max_tokens, config_overrides=engine_options[p]
                )
                runs[p][b].append(res.output_tokens_per_s)
                decode_runs[p][b].append(res.decode_tokens_per_s)  # decode-only steps: what the roofline bounds
                logger.info("round %d batch %2d %-5s %7.1f out tok/s", r + 1, b, p, res.output_tokens_per_s)
    bandwidth_after = asyncio.run(run_in_short_lived_thread(stream_bandwidth, args.stream_mib))
    logger.info("memory bandwidth after: %s", ", ".join(f"{k} {v:.1f}" for k, v in bandwidth_after.items()))
    bandwidth = {k: max(v, bandwidth_after[k]) if "best" in k else v for k, v in bandwidth_before.items()}
    best_bw = bandwidth["copy_best_gb_s"] * 1e9
    read_bw = bandwidth["read_best_gb_s"] * 1e9
    summary = []
    for p in precisions:
        weight_bytes = loaded[p].report.measured_weights_bytes + loaded[p].report.measured_quant_state_bytes
        medians = {b: statistics.median(v) for b, v in runs[p].items()}
        roofline = best_bw / weight_bytes
        row = {
            "precision": p,
            "decode_step": engine_options[p],
            "weight_bytes_per_token": weight_bytes,
            "roofline_batch1_tok_s": roofline,
            "read_bound_batch1_tok_s": read_bw / weight_bytes,
            "median_out_tok_s": medians,
            "median_decode_tok_s": {b: statistics.median(v) for b, v in decode_runs[p].items()},
            "all_runs_out_tok_s": runs[p],
        }
        summary.append(row)
    base = {b: statistics.median(runs[precisions[0]][b]) for b in batches}
    print(
        f"\nbandwidth, best of 5 before and after: copy {bandwidth['copy_best_gb_s']:.1f} GB/s (the roofline), "
        f"read {bandwidth['read_best_gb_s']:.1f} GB/s; medians of {args.repeats} runs"
    )
    print(
        f"{'precision':>9} {'weights MiB':>11} {'roofline b1':>11} "
        + " ".join(f"{'b=' + str(b):>8}" for b in batches)
        + f" {'b1 decode':>9} {'decode / roofline':>17} {'/ read bound':>12} "
        + " ".join(f"{'vs ' + precisions[0] + ' b' + str(b):>12}" for b in batches)
    )
    for row in summary:
        med, roofline = row["median_out_tok_s"], row["roofline_batch1_tok_s"]
        decode = row["median_decode_tok_s"][batches[0]]
        print(
            f"{row['precision']:>9} {row['weight_bytes_per_token'] / 2**20:>11.1f} {roofline:>11.1f} "
            + " ".join(f"{med[b]:>8.1f}" for b in batches)
            + f" {decode:>9.1f} {decode / roofline:>17.2f} {decode / row['read_bound_batch1_tok_s']:>12.2f} "
            + " ".join(f"{med[b] / base[b]:>11.2f}x" for b in batches)
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "repeats": args.repeats,
                "compile": args.compile,
                "bandwidth": bandwidth,
                "bandwidth_before": bandwidth_before,
                "bandwidth_after": bandwidth_after,
                "results": summary,
            },
            indent=2,
            default=str,
        )
    )
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
