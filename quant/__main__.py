"""`python -m fitserve.quant`: the same as `fitserve plan`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from fitserve.quant.plan_cli import add_plan_arguments, run_plan


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the plan options and run the plan; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fitserve.quant", description="Show which precision fits the budget."
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level")
    add_plan_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return run_plan(args)


if __name__ == "__main__":
    sys.exit(main())
