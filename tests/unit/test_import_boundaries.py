"""Import boundaries: the HTTP layer and the engine's torch-free parts never import torch or transformers.

Each check runs in a fresh interpreter, so modules other tests imported do not hide an import.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fitserve.server.routes

ROUTE_MODULES = sorted(
    f"fitserve.server.routes.{info.name}" for info in pkgutil.iter_modules(fitserve.server.routes.__path__)
)
TORCH_FREE_MODULES = (
    "fitserve.server.app",
    "fitserve.server.serve_cli",
    *ROUTE_MODULES,
    "fitserve.server.engine.types",
    "fitserve.server.engine.scheduler",
    "fitserve.server.engine.block_pool",
    "fitserve.server.engine.bridge",
    "fitserve.server.engine.output",
    "fitserve.server.engine.stats",
    "fitserve.server.engine.detokenizer",
    "fitserve.server.engine.config",
)


def _heavy_modules_after(code: str) -> list[str]:
    probe = code + "\nimport sys\nprint(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_every_route_module_is_checked() -> None:
    assert {"fitserve.server.routes.completions", "fitserve.server.routes.chat"} <= set(ROUTE_MODULES)


def test_http_layer_and_torch_free_engine_parts_do_not_import_torch() -> None:
    """One fresh interpreter imports the modules one by one and names the first that pulls torch in."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(TORCH_FREE_MODULES)!r}:\n"
        "    importlib.import_module(name)\n"
        "    heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "    assert not heavy, f'importing {name} imported {heavy}'\n"
    )
    assert _heavy_modules_after(code) == []


def test_building_the_app_around_a_fake_engine_does_not_import_torch() -> None:
    code = (
        "from fitserve.server.app import create_app\n"
        "from fitserve.server.settings import Settings\n"
        "from tests.fakes import FakeEngine\n"
        "create_app(Settings(), engine=FakeEngine())\n"
    )
    assert _heavy_modules_after(code) == []


def test_the_probe_does_see_torch() -> None:
    """The check is real: the runner side does import torch."""
    assert "torch" in _heavy_modules_after("import fitserve.server.engine.runner")
