"""`fitserve plan`: show what fits the memory budget, without loading a weight.

Exit status: 0 a precision fits, 3 nothing fits (or a forced precision does not), 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from fitserve.quant.plan_flags import add_plan_flags

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NOTHING_FITS = 3


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The plan options (shared by `fitserve plan` and `python -m fitserve.quant`); the planning flags that
    `fitserve serve` takes too come from `quant.plan_flags`."""
    add_plan_flags(parser, with_defaults=True)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=2048,
        help="tokens in one forward pass, sizes the activation overhead (default 2048)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=8,
        help="sequences in one step (serve's --max-batch-size): sizes the logits buffer and caps "
        "the useful KV capacity (default 8, as serve)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda:N or cuda (all GPUs); default: GPUs if present")
    parser.add_argument("--double-quant", action="store_true", help="NF4 with double quantization")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_plan_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `plan` subcommand on the `fitserve` dispatcher."""
    parser = subparsers.add_parser(
        "plan",
        help="show which precision fits the memory budget (loads no weights)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_plan_arguments(parser)
    parser.set_defaults(func=run_plan)
    return parser


def _error_json(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind}, "chosen": None}


def run_plan(args: argparse.Namespace) -> int:
    """Plan and print; returns the exit status (0 fits, 3 nothing fits, 2 bad input)."""
    from pydantic import ValidationError

    from fitserve.quant.budget import BudgetError, parse_size
    from fitserve.quant.model_store import FetchError, ModelNotFoundError, resolve_model
    from fitserve.quant.plan import NothingFitsError, PlanInputError, PlanRequest, make_plan

    try:
        budget = parse_size(args.memory_budget) if args.memory_budget is not None else None
        model = resolve_model(args.model)
        request = PlanRequest(
            model=model,
            memory_budget_bytes=budget,
            max_model_len=args.max_model_len,
            min_concurrency=args.min_concurrency,
            precision=args.precision,
            force=args.force,
            max_batch_tokens=args.max_batch_tokens,
            max_num_seqs=args.max_num_seqs,
            max_kv_tokens=args.max_kv_tokens,
            device=args.device,
            double_quant=args.double_quant,
            prefer_fp32_on_cpu=args.prefer_fp32_on_cpu,
            trust_remote_code=args.trust_remote_code,
            quant_backend=args.quant_backend,
        )
        plan = make_plan(request)
    except NothingFitsError as error:
        _emit(args, error.plan, message=str(error))
        return EXIT_NOTHING_FITS
    except (BudgetError, PlanInputError, ModelNotFoundError, FetchError, ValidationError, ValueError) as error:
        message = _short(error)
        if args.json:
            print(json.dumps(_error_json(message, type(error).__name__)))
        else:
            print(f"fitserve plan: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _emit(args, plan)
    return EXIT_OK


def _short(error: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in error.errors())
    return str(error)


def _emit(args: argparse.Namespace, plan: Any, message: str | None = None) -> None:
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        if message:
            print(message, file=sys.stderr)
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(plan.to_table())
    if message:
        Console(stderr=True, width=None if sys.stderr.isatty() else 140).print(message, markup=False, highlight=False)
    else:
        console.print(plan.verdict(), markup=False, highlight=False)
