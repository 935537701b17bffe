"""Decode-step time of each `--compile-modes` x `--forwards` variant, side by side in one process (no HTTP, no
scheduler loop).

For each batch size B: B sequences of `--prompt-tokens` are prefilled once per variant (each has its own model,
runner and KV cache), then decode-only steps run with the variants alternating step by step, so a change
in the machine's load hits every variant alike. Prints and writes the median step time per (B, variant) and each
variant's ratio to the first. `--forwards direct,direct-separate,transformers` compares the direct Llama layer loop
(server/engine/llama_forward.py) with its q/k/v and gate/up projections joined (the default) or separate, and
`model(...)`; `--precision` loads the model as `fitserve serve --precision P` does (int8/int4: torch's weight-only
kernels on CPU).

    .venv/bin/python benchmarks/decode_step.py --compile-modes off,eager --batch-sizes 1,4,16 --steps 20
    .venv/bin/python benchmarks/decode_step.py --compile-modes off --forwards direct,direct-separate --precision int4
    .venv/bin/python benchmarks/decode_step.py --compile-modes off,inductor --batch-sizes 1 --precision bf16 \
        --keep-dense-linears
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("decode_step")
FORWARDS_DIRECT = ("direct", "direct-separate")  # the direct Llama loop, projections joined or separate


def prefill(runner: Any, batch: int, prompt_tokens: int, max_tokens: int) -> tuple[Any, list[Any]]:
    """A scheduler with `batch` sequences whose prompts are computed; returns it and the sequences."""
    from fitserve.server.engine.scheduler import Scheduler, Sequence
    from fitserve.server.engine.types import SamplingParams

    sched = Scheduler(runner.config)
    seqs = []
    for i in range(batch):
        prompt = [100 + (7 * i + j) % 20000 for j in range(prompt_tokens)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seqs.append(Sequence(f"s{i}", prompt, len(prompt), params, 0.0))
        sched.add(seqs[-1])
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in seqs):
        b = sched.schedule()
        sched.postprocess(b, [t.token_id for t in runner.run(b)])
    return sched, seqs


def bench(
    models: list[Any],
    variants: list[tuple[str, str]],
    batch: int,
    prompt_tokens: int,
    steps: int,
    keep_dense_linears: bool = False,
) -> dict[str, list[float]]:
    """Per variant (compile mode, forward), the wall time of each of `steps` decode-only steps (interleaved); each
    variant runs on its own model in `models` (runners change their model in place: packing, joining)."""
    from fitserve.server.engine.compile_mode import CompileMode
    from fitserve.server.engine.config import EngineConfig
    from fitserve.server.engine.runner import ModelRunner

    states = {}
    modes = [variant_label(v) for v in variants]
    for (compile_mode, forward), mode, model in zip(variants, modes, models, strict=True):
        cfg = EngineConfig(
            served_model_name="bench",
            max_model_len=max(512, prompt_tokens + steps + 16),
            kv_capacity_tokens=-(-(batch * (prompt_tokens + steps + 32) + 1024) // 16) * 16,  # whole blocks
            max_batch_size=batch,
            max_prefill_tokens=max(512, prompt_tokens * batch),
            compile_mode=CompileMode(compile_mode),
            direct_forward=forward in FORWARDS_DIRECT,
            join_projections=forward == "direct",
            spare_bytes=2 << 30,  # room for packed copies, as `fitserve serve` with the default budget
            keep_dense_cpu_linears=keep_dense_linears and compile_mode != "off",
            device=str(model.device),
        )
        runner = ModelRunner(model, cfg)
        states[mode] = (runner, *prefill(runner, batch, prompt_tokens, steps + 4))
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(steps + 1):  # the first step of each mode is a warm-up, not counted
        for mode in modes:
            runner, sched, _seqs = states[mode]
            b = sched.schedule()
            assert b.decodes and not b.prefills
            t0 = time.perf_counter()
            tokens = runner.run(b)
            times[mode].append(time.perf_counter() - t0)
            sched.postprocess(b, [t.token_id for t in tokens])
    return {m: t[1:] for m, t in times.items()}


def variant_label(variant: tuple[str, str]) -> str:
    """`compile_mode/forward`, the name a variant has in the output."""
    return "/".join(variant)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile-modes", default="off,eager")
    p.add_argument(
        "--forwards",
        default="direct",
        help="comma-separated: direct (the default: direct loop, projections joined), direct-separate, transformers",
    )
    p.add_argument("--precision", default=None, help="load as `fitserve serve --precision P` (overrides --dtype)")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--keep-dense-linears",
        action="store_true",
        help="compiled variants keep dense weights beside oneDNN's packed ones (`matvec` at batch 1, as AUTO on bf16)",
    )
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-dir", type=Path, default=None, help="default: the cached default model")
    p.add_argument("--out", type=Path, default=Path("bench-out/decode_step.json"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from transformers import AutoModelForCausalLM

    from fitserve.quant.model_store import default_model_dir

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model_dir = args.model_dir or default_model_dir()

    def load_model() -> Any:
        if args.precision is not None:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from precision_decode import load  # a sibling script, not a package

            return load(model_dir, args.precision, "auto").model
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()

    variants = [
        (m.strip(), f.strip())
        for m in args.compile_modes.split(",")
        if m.strip()
        for f in args.forwards.split(",")
        if f.strip()
    ]
    modes = [variant_label(v) for v in variants]
    rows: list[dict[str, Any]] = []

    def run_all() -> None:  # one thread does all torch work, loading included (docs/engine.md on OpenMP masters)
        models = [load_model() for _ in variants]
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            times = bench(models, variants, batch, args.prompt_tokens, args.steps, args.keep_dense_linears)
            base = statistics.median(times[modes[0]])
            for mode in modes:
                med = statistics.median(times[mode])
                rows.append({"batch_size": batch, "mode": mode, "median_step_s": med, "steps_s": times[mode]})
                logger.info(
                    "batch %2d %-12s median decode step %7.1f ms (%.2fx of %s)",
                    batch,
                    mode,
                    med * 1e3,
                    med / base,
                    modes[0],
                )

    worker = threading.Thread(target=run_all)
    worker.start()
    worker.join()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "dtype": args.precision or args.dtype,
        "device": args.device,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
    }
    args.out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
