"""The scale-out package stays optional: the core never imports Ray, and `--replicas` without Ray says so."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from fitserve.server.scaleout.config import ScaleoutConfig
from fitserve.server.scaleout.launch import scaleout_config
from fitserve.server.settings import Settings

CORE_AND_RAY_FREE_MODULES = (
    "fitserve.server.cli",
    "fitserve.server.serve",
    "fitserve.server.app",
    "fitserve.server.serve_cli",
    "fitserve.server.scaleout.routing",
    "fitserve.server.scaleout.autoscale",
    "fitserve.server.scaleout.budget",
    "fitserve.server.scaleout.config",
    "fitserve.server.scaleout.errors",
    "fitserve.server.scaleout.request",
    "fitserve.server.scaleout.client",
    "fitserve.server.scaleout.group_call",
    "fitserve.server.scaleout.streams",
    "fitserve.server.scaleout.launch",
)


def test_the_core_and_the_pure_scaleout_modules_never_import_ray() -> None:
    code = "import sys\n" + "".join(f"import {name}\n" for name in CORE_AND_RAY_FREE_MODULES)
    code += "assert 'ray' not in sys.modules, 'ray was imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed: --replicas works here")
def test_replicas_without_the_ray_extra_is_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fitserve", "serve", "--replicas", "2"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "pip install 'fitserve[ray]'" in result.stderr + result.stdout


def test_cli_settings_become_the_application_config() -> None:
    settings = Settings(api_key="k", memory_budget="1GiB", max_batch_size=4, port=9000)
    config = scaleout_config(settings, 2)
    assert config.num_replicas == 2 and config.autoscaling is None
    assert config.settings["api_key"] == "k" and "port" not in config.settings
    assert config.engine_settings().api_key_value() == "k"
    scaled = scaleout_config(settings, 1, max_replicas=3)
    assert scaled.autoscaling is not None and (scaled.autoscaling.min_replicas, scaled.autoscaling.max_replicas) == (
        1,
        3,
    )
    round_trip = ScaleoutConfig.model_validate(config.model_dump(mode="json"))
    assert round_trip == config
