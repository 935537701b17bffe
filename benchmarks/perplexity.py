"""Perplexity of the default model on a fixed text, per precision, against bf16 (prints and writes JSON).

.venv/bin/python benchmarks/perplexity.py --precisions bf16,fp32,int8,int4,nf4 --out bench-out/perplexity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXT = Path(__file__).resolve().parent / "data" / "declaration_of_independence.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--precisions", default="bf16,fp32,int8,int4,nf4", help="bf16 first: the reference")
    parser.add_argument("--quant-backend", default="auto", choices=("auto", "torch", "bitsandbytes"))
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--out", type=Path, default=Path("bench-out/perplexity.json"))
    args = parser.parse_args()

    import torch

    from fitserve.quant.load import load_model
    from fitserve.quant.model_store import fetch_default_model
    from fitserve.quant.perplexity import perplexity
    from fitserve.quant.plan import PlanRequest, make_plan

    torch.set_num_threads(2)
    model_dir = args.model_dir or fetch_default_model()
    text = args.text.read_text()
    results: dict[str, float] = {}
    for precision in args.precisions.split(","):
        request = PlanRequest(
            model=model_dir, memory_budget_bytes=4 << 30, precision=precision, quant_backend=args.quant_backend
        )
        loaded = load_model(make_plan(request))
        results[precision] = perplexity(loaded.model, loaded.tokenizer, text)
        reference = next(iter(results.values()))
        print(
            f"{precision:>5}: perplexity {results[precision]:.3f} ({results[precision] / reference - 1:+.2%} vs first)"
        )
        del loaded
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"text": str(args.text), "perplexity": results}, indent=2))


if __name__ == "__main__":
    main()
