"""What drawing the tokens of a sampled (temperature > 0) decode step costs: the engine's inverse-transform draw
(`draw_tokens`, now) vs `torch.multinomial` row by row (before); the top-p filter plus the draw, before (a full sort
of each row) and now (the best 1,024 tokens first); and the whole `sample()` call.

For each batch size B: B rows of the default model's real next-token logits (49,152 tokens; the last position of B
different chat prompts, fp32), temperature 1 and top-p 0.9 (the filtered path), one seeded generator per row, as
`sample_sequences` gives them. Real logits matter: how much of a row's mass its best 1,024 tokens hold decides how
`apply_top_k_top_p` filters it. The variants run
alternating, `--repeats` times each; prints and writes the median per (B, variant) and the ratio to the baseline.

    .venv/bin/python benchmarks/sampling_cost.py --out bench-out/sampling_cost.json
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

from fitserve.server.engine.sampling import _filter_sorted, apply_top_k_top_p, draw_tokens, make_generator, sample
from fitserve.server.engine.types import SamplingParams


def multinomial_rows(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """The draw `sample()` used before: `torch.multinomial` on each row with its generator."""
    return [int(torch.multinomial(probs[i], 1, generator=g).item()) for i, g in enumerate(generators)]


def filtered_probs(logits: torch.Tensor, top_k_top_p: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The probabilities `sample()` draws from at temperature 1 and top-p 0.9, filtered by `top_k_top_p`."""
    rows, vocab = logits.shape
    top_k = torch.full((rows,), vocab)
    return top_k_top_p(logits, top_k, torch.full((rows,), 0.9)).softmax(dim=-1)


def median_us(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` in microseconds (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def model_logits(model_dir: Path, rows: int) -> torch.Tensor:
    """[rows, vocab] next-token logits of the model for `rows` different chat prompts (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    topics = ["the sea", "bread", "a city at night", "trains", "the moon", "gardens", "winter", "music"]
    out = []
    with torch.inference_mode():
        for i in range(rows):
            text = f"Write sentence {i} of a short story about {topics[i % len(topics)]}."
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True
            )["input_ids"]
            out.append(model(input_ids=torch.tensor([list(ids)])).logits[0, -1])
    return torch.stack(out)


def measure(all_logits: torch.Tensor, batch: int, repeats: int) -> list[dict[str, object]]:
    """The variants' median times for one batch size, alternating; prints a line per variant."""
    logits = all_logits[:batch]
    probs = logits.softmax(dim=-1)
    generators = [make_generator(i) for i in range(batch)]
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.9, seed=i) for i in range(batch)]
    variants: dict[str, Callable[[], object]] = {
        "multinomial per row": lambda: multinomial_rows(probs, generators),
        "draw_tokens": lambda: draw_tokens(probs, generators).tolist(),
        "before: sort filter + multinomial": lambda: multinomial_rows(
            filtered_probs(logits, _filter_sorted), generators
        ),
        "now: candidate filter + draw_tokens": lambda: draw_tokens(
            filtered_probs(logits, apply_top_k_top_p), generators
        ),
        "sample() temperature 1, top-p 0.9": lambda: sample(logits, params, [()] * batch, generators),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # alternate, so a change in the machine's load hits every variant alike
        for name, fn in variants.items():
            times[name].append(median_us(fn, max(1, repeats // 3)))
    base = statistics.median(times["multinomial per row"])
    rows: list[dict[str, object]] = []
    for name, values in times.items():
        med = statistics.median(values)
        rows.append({"batch_size": batch, "variant": name, "median_us": med, "ratio_to_multinomial": med / base})
        print(f"batch {batch:3d}  {name:36s} {med / 1e3:8.2f} ms  ({med / base:.3f}x of multinomial per row)")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--model-dir", type=Path, default=None, help="default: the cached default model")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-out/sampling_cost.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from fitserve.quant.model_store import default_model_dir

    batches = [int(b) for b in args.batch_sizes.split(",")]
    logits = model_logits(args.model_dir or default_model_dir(), max(batches))
    rows = [row for batch in batches for row in measure(logits, batch, args.repeats)]
    meta = {
        "vocab": logits.shape[-1],
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
