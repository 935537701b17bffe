"""The distribution installs its code under the `fitserve` namespace and nothing else at the top level."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = {"quant": "fitserve.quant", "server": "fitserve.server", "loadtest": "fitserve.loadtest"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _source_packages() -> set[str]:
    """Every folder with an __init__.py below quant/, server/ and loadtest/, by its installed name."""
    names = {"fitserve"}
    for folder, installed in SOURCE_FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            names.add(".".join([installed, *relative.parts]))
    return names


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = _pyproject()["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _source_packages()
    assert setuptools["package-dir"] == {"fitserve": "src/fitserve", **{v: k for k, v in SOURCE_FOLDERS.items()}}


def test_console_script_points_into_the_namespace() -> None:
    assert _pyproject()["project"]["scripts"] == {"fitserve": "fitserve.server.cli:main"}


def test_code_imports_only_the_namespaced_names() -> None:
    """No module imports the bare folder names (they would load a second copy of each module)."""
    offenders = []
    for folder in (*SOURCE_FOLDERS, "tests", "benchmarks", "src"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                for bare in SOURCE_FOLDERS:
                    if stripped.startswith((f"from {bare}.", f"from {bare} import", f"import {bare}")):
                        offenders.append(f"{path.relative_to(ROOT)}:{number}: {stripped}")
    assert offenders == []


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The file list of a wheel built from the working tree (pip, with build isolation, no dependencies)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("fitserve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_holds_only_the_fitserve_namespace(wheel_names: list[str]) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel_names}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert top_level - dist_info == {"fitserve"}
    for module in (
        "fitserve/__init__.py",
        "fitserve/__main__.py",
        "fitserve/server/cli.py",
        "fitserve/server/engine/scheduler.py",
        "fitserve/quant/plan.py",
        "fitserve/loadtest/cli.py",
    ):
        assert module in wheel_names


def test_wheel_holds_every_source_module(wheel_names: list[str]) -> None:
    expected = {
        "fitserve/" + str(path.relative_to(ROOT)) for folder in SOURCE_FOLDERS for path in (ROOT / folder).rglob("*.py")
    }
    assert expected <= set(wheel_names)
