"""Decode throughput of the engine alone (no HTTP) at several batch sizes.

For each batch size B, B requests (same prompt length, ignore_eos, fixed max_tokens) are submitted at once and
run to completion. Reported per B: output tokens/s over the whole run, decode tokens/s (decode-only steps:
decode tokens / their step time), median TTFT and mean step time, plus a plain `model.generate` batch-1 baseline.

    .venv/bin/python benchmarks/engine_throughput.py --dtype fp32 --batch-sizes 1,4,16 --hf-cb \
        --out bench-out/engine.json
    # decode-step modes side by side (alternating, --repeats times each; medians reported)
    .venv/bin/python benchmarks/engine_throughput.py --compile-modes off,eager --repeats 3 --no-baseline
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("engine_throughput")


class DType(enum.StrEnum):
    """Dense precisions worth comparing (fp16 for CUDA cards)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


@dataclass
class Result:
    """Numbers for one batch size."""

    batch_size: int
    compile_mode: str
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    decode_tokens_per_s: float
    mean_decode_step_s: float
    median_ttft_s: float
    steps: int


class _Sink:
    def __init__(self) -> None:
        self.steps: list[Any] = []
        self.requests: list[Any] = []

    def record_step(self, stats: Any) -> None:
        self.steps.append(stats)

    def record_request(self, stats: Any) -> None:
        self.requests.append(stats)


def default_model_dir() -> Path:
    """The converted default model (fetched by `fitserve model fetch`)."""
    from fitserve.quant.model_store import fetch_default_model

    return fetch_default_model()


def load(model_dir: Path, dtype: DType, device: str = "cpu") -> tuple[Any, Any]:
    """The model in `dtype` on `device`, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def bench_engine(
    model: Any,
    tokenizer: Any,
    batch: int,
    prompt_tokens: int,
    max_tokens: int,
    batched_decode: bool = False,
    prepack: bool = True,
    pack_shared: bool = False,
    compile_mode: str = "off",
    config_overrides: dict[str, Any] | None = None,
) -> Result:
    """Run `batch` requests through a fresh Engine on the model's device and time them; `config_overrides` are
    further `EngineConfig` fields (those `fitserve serve` derives from its plan, for example)."""
    from fitserve.server.engine.compile_mode import CompileMode
    from fitserve.server.engine.config import EngineConfig
    from fitserve.server.engine.engine import Engine
    from fitserve.server.engine.types import SamplingParams
    from fitserve.server.serve import run_in_short_lived_thread

    sink = _Sink()
    fields: dict[str, Any] = dict(
        served_model_name="bench",
        max_model_len=max(512, prompt_tokens + max_tokens),
        max_batch_size=batch,
        compile_mode=CompileMode(compile_mode),
        kv_capacity_tokens=max(4096, -(-(batch * (prompt_tokens + max_tokens) + 256) // 16) * 16),
        max_prefill_tokens=max(512, prompt_tokens * batch),
        batched_decode_attention=batched_decode,
        prepack_cpu_linears=prepack,
        spare_bytes=2**40 if pack_shared else 0,
        device=str(model.device),
    )
    cfg = EngineConfig(**(fields | (config_overrides or {})))
    prompts = [[100 + (7 * i + j) % 20000 for j in range(prompt_tokens)] for i in range(batch)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def main() -> float:
        # built in a thread that exits, so the engine thread is the only OpenMP master (see server/serve.py)
        engine = await run_in_short_lived_thread(lambda: Engine(model, tokenizer, cfg, stats_sink=sink))
        await engine.start()

        async def one(i: int) -> int:
            return sum([len(o.token_ids_delta) async for o in engine.generate(prompts[i], params, f"b{i}")])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(batch)))
        wall = time.perf_counter() - t0
        await engine.stop(timeout_s=5)
        assert sum(counts) == batch * max_tokens
        return wall

    wall = asyncio.run(main())
    decode_steps = [s for s in sink.steps if s.prefill_tokens == 0]
    decode_time = sum(s.step_duration_s for s in decode_steps)
    decode_tokens = sum(s.decode_tokens for s in decode_steps)
    return Result(
        batch_size=batch,
        compile_mode=compile_mode,
        output_tokens=batch * max_tokens,
        wall_s=wall,
        output_tokens_per_s=batch * max_tokens / wall,
        decode_tokens_per_s=decode_tokens / decode_time if decode_time else 0.0,
        mean_decode_step_s=decode_time / len(decode_steps) if decode_steps else 0.0,
        median_ttft_s=statistics.median(r.ttft_s for r in sink.requests),
        steps=len(sink.steps),
    )


def bench_generate(model: Any, prompt_tokens: int, max_tokens: int) -> float:
    """Plain `model.generate` at batch 1 (tokens/s), the single-stream baseline."""
    import torch

    ids = torch.tensor([[100 + j for j in range(prompt_tokens)]], device=model.device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        return max_tokens / (time.perf_counter() - t0)


def bench_hf_continuous_batching(
    model_dir: Path, dtype: DType, batch: int, prompt_tokens: int, max_tokens: int, device: str = "cpu"
) -> float:
    """transformers' own continuous batching (`generate_batch`, what `transformers serve --continuous-batching`
    runs) on the same prompts, in a fresh model copy; returns output tokens/s."""
    from transformers import GenerationConfig

    model, _ = load(model_dir, dtype, device)
    prompts = [[100 + (7 * i + j) % 20000 for j in range(prompt_tokens)] for i in range(batch)]
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    # its own warm-up (CUDA-graph capture, seconds on CPU) runs on a first call, outside the timing
    model.generate_batch(prompts[:1], generation_config=config, progress_bar=False, max_new_tokens=2)
    t0 = time.perf_counter()
    outputs = model.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False)
    wall = time.perf_counter() - t0
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return generated / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--dtype", type=DType, default=DType.FP32, choices=list(DType))
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--no-baseline", action="store_true", help="skip the model.generate batch-1 baseline")
    parser.add_argument(
        "--hf-cb", action="store_true", help="also time transformers' generate_batch (continuous batching)"
    )
    parser.add_argument("--batched-decode", action="store_true", help="EngineConfig.batched_decode_attention")
    parser.add_argument("--compile-modes", default="off", help="EngineConfig.compile_mode values, run alternately")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (batch size, mode), alternating modes")
    parser.add_argument("--no-prepack", action="store_true", help="EngineConfig.prepack_cpu_linears=False (fp32 CPU)")
    parser.add_argument(
        "--pack-shared-weights", action="store_true", help="also pack tied weights (an extra copy of lm_head)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out/engine_throughput.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.set_num_threads(args.threads)
    model_dir = args.model_dir or default_model_dir()
    model, tokenizer = load(model_dir, args.dtype, args.device)
    baseline = None
    if not args.no_baseline:  # in a thread that exits: a live OpenMP team would slow the engine thread
        box: list[float] = []
        worker = threading.Thread(target=lambda: box.append(bench_generate(model, args.prompt_tokens, args.max_tokens)))
        worker.start()
        worker.join()
        baseline = box[0]
    results = []
    # warm-up (first forward allocates, first SDPA picks kernels)
    packing = {"prepack": not args.no_prepack, "pack_shared": args.pack_shared_weights}
    bench_engine(model, tokenizer, 1, args.prompt_tokens, 4, **packing)
    modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    for b in (int(x) for x in args.batch_sizes.split(",")):
        for repeat in range(args.repeats):
            for mode in modes:  # alternating, so drift in the machine's load hits every mode alike
                r = bench_engine(
                    model,
                    tokenizer,
                    b,
                    args.prompt_tokens,
                    args.max_tokens,
                    args.batched_decode,
                    **packing,
                    compile_mode=mode,
                )
                results.append(r)
                logger.info(
                    "batch %2d %-8s run %d: %7.1f output tok/s, %7.1f decode tok/s, decode step %6.1f ms, TTFT %6.3f s",
                    b,
                    mode,
                    repeat + 1,
                    r.output_tokens_per_s,
                    r.decode_tokens_per_s,
                    r.mean_decode_step_s * 1e3,
                    r.median_ttft_s,
                )
        for mode in modes:
            steps = [r.mean_decode_step_s for r in results if r.batch_size == b and r.compile_mode == mode]
            logger.info(
                "batch %2d %-8s median decode step %6.1f ms over %d runs",
                b,
                mode,
                statistics.median(steps) * 1e3,
                len(steps),
            )
    if baseline is not None:
        logger.info("model.generate batch 1: %.1f tok/s", baseline)
    hf_cb: dict[int, float] = {}
    if args.hf_cb:
        for b in (int(x) for x in args.batch_sizes.split(",")):
            hf_cb[b] = bench_hf_continuous_batching(
                model_dir, args.dtype, b, args.prompt_tokens, args.max_tokens, args.device
            )
            logger.info("transformers generate_batch, batch %2d: %7.1f output tok/s", b, hf_cb[b])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "dtype": args.dtype.value,
                "device": args.device,
                "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "generate_batch1_tokens_per_s": baseline,
                "batched_decode_attention": args.batched_decode,
                "compile_modes": modes,
                "repeats": args.repeats,
                "prepack_cpu_linears": not args.no_prepack,
                "pack_shared_weights": args.pack_shared_weights,
                "hf_generate_batch_tokens_per_s": hf_cb,
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
