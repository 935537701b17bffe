"""`fitserve model fetch|list`: manage the local model cache."""

from __future__ import annotations

import argparse
import logging

from fitserve.quant.model_store import FetchError, fetch_default_model, fitserve_home, list_models

logger = logging.getLogger(__name__)


def add_model_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the `model` subcommand with its `fetch` and `list` actions."""
    parser = subparsers.add_parser("model", help="fetch the default model, list cached models")
    actions = parser.add_subparsers(dest="model_action", required=True)
    fetch = actions.add_parser("fetch", help="download and convert the default model (idempotent)")
    fetch.set_defaults(func=run_fetch)
    listing = actions.add_parser("list", help="list the models in the cache ($FITSERVE_HOME)")
    listing.set_defaults(func=run_list)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch the default model; print its directory."""
    try:
        path = fetch_default_model()
    except FetchError as error:
        logger.error("%s", error)
        return 1
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Print one line per cached model: name, size, path."""
    models = list_models()
    if not models:
        print(f"no models cached under {fitserve_home()} (run `fitserve model fetch`)")
        return 0
    for model in models:
        print(f"{model.name}\t{model.size_bytes / 2**20:.1f} MiB\t{model.path}")
    return 0
