"""fitserve: plan, load and serve an LLM that fits a memory budget.

The distribution installs its three parts under this one namespace: `fitserve.quant` (budget, estimates, plan,
loader, model cache; usable alone), `fitserve.server` (the OpenAI-compatible server and its engine) and
`fitserve.loadtest` (an HTTP-only load generator). In the repository they are the top-level folders `quant/`,
`server/` and `loadtest/`, mapped here by `package-dir` in pyproject.toml.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fitserve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
