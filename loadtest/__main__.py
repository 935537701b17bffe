"""`python -m fitserve.loadtest ...`: the same as `fitserve loadtest ...`."""

from __future__ import annotations

import argparse
import logging
import sys

from fitserve.loadtest.cli import add_arguments, run_loadtest


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the load test; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m fitserve.loadtest", description="Load-test an OpenAI-compatible server."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_loadtest(args)


if __name__ == "__main__":
    sys.exit(main())
