"""The `fitserve` console script: one argparse dispatcher over the packages' subcommands.

Each subcommand lives next to the code it drives and registers itself through an `add_*_parser` function;
heavy imports (torch, transformers) happen inside the subcommand, never here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# (module, function) pairs that each add one subcommand.
_SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("fitserve.quant.plan_cli", "add_plan_parser"),
    ("fitserve.server.serve_cli", "add_serve_parser"),
    ("fitserve.loadtest.cli", "add_loadtest_parser"),
    ("fitserve.quant.model_cli", "add_model_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="fitserve", description="Plan, load and serve an LLM that fits your memory.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{plan,serve,loadtest,model}")
    for module_name, function_name in _SUBCOMMANDS:
        getattr(importlib.import_module(module_name), function_name)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fitserve` command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
