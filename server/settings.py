"""The one settings object of `fitserve serve`.

Values come from, in increasing priority: defaults, `FITSERVE_*` environment variables, explicit CLI flags
(passed as keyword arguments by `server.serve_cli`). This is the only module in `server/` that reads the
environment; everything else receives a `Settings` instance.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fitserve.server.engine.compile_mode import CompileMode

DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class LogLevel(enum.StrEnum):
    """Logging levels accepted by `--log-level`."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class Settings(BaseSettings):
    """Everything `fitserve serve` needs to plan, load and serve a model."""

    model_config = SettingsConfigDict(env_prefix="FITSERVE_", extra="ignore", frozen=True)

    model: str | None = Field(None, description="model directory or hub id; None serves the cached default model")
    served_model_name: str | None = Field(None, description="name clients must send as `model`; default: dir name")
    host: str = Field("127.0.0.1", description="bind address; loopback unless set explicitly")
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(
        None, description="require `Authorization: Bearer <key>` on every route but /health, /ready, /version"
    )
    metrics_require_key: bool = Field(False, description="with an API key: /metrics needs it too")
    memory_budget: str | None = Field(None, description="e.g. '2GiB'; None: detect from the device")
    max_model_len: int | None = Field(None, ge=1, description="context length cap; None: the model's own")
    min_concurrency: int = Field(1, ge=1, description="full-length sequences the KV cache must hold")
    max_kv_tokens: int | None = Field(None, ge=1, description="cap on KV cache tokens; None: all the budget allows")
    precision: str = Field("auto", description="weight precision for the planner, or 'auto'")
    force: bool = Field(False, description="load even if the plan says it does not fit")
    quant_backend: str = Field("auto", description="int8/4-bit kernels: auto, torch (CPU) or bitsandbytes")
    prefer_fp32_on_cpu: bool = Field(True, description="fp32 first on CPUs without native bf16, when it fits")
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="most sequences decoded in one step; None: as many as the plan's KV cache admits, at most 64",
    )
    compile_mode: CompileMode = Field(
        CompileMode.AUTO,
        description="decode step: auto (CUDA graphs on GPU; CPU: batch 1 compiled for int8/int4 if it fits, else "
        "off), off, eager, inductor, cuda-graphs",
    )
    max_waiting: int = Field(256, ge=0, description="queued requests beyond which new ones get 429")
    max_choices_per_request: int = Field(
        64, ge=1, description="most engine requests one HTTP request may ask for (prompts x n)"
    )
    max_prefill_tokens: int | None = Field(None, ge=1, description="prefill token budget per step")
    enable_prefix_caching: bool = Field(True, description="reuse cached KV blocks of prompts' shared prefixes")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1, description="request bodies above this get 413")
    shutdown_timeout_s: float = Field(
        30.0, ge=0, description="grace period for running requests on SIGTERM or after the engine died"
    )
    tokenizer_workers: int = Field(2, ge=1, description="threads that tokenize, template and detokenize requests")
    tokenizer_max_queued: int = Field(
        64, ge=0, description="requests waiting for a tokenizer thread beyond which new ones get 429 (per lane)"
    )
    tokenizer_large_body_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="requests with a larger body are tokenized on their own lane, so they never delay small ones",
    )
    tokenizer_large_body_workers: int = Field(1, ge=1, description="threads of the large-body tokenizer lane")
    engine_health_interval_s: float = Field(
        1.0, gt=0, description="how often the server checks the engine loop; a dead one stops the server"
    )
    trust_remote_code: bool = Field(False, description="allow model repositories to run their own code")
    oom_inject_steps: Annotated[tuple[int, ...], NoDecode] = Field(
        (), description="fault injection: engine steps that raise OOM"
    )
    crash_inject_step: int | None = Field(
        None, ge=1, description="fault injection: the engine step at which the engine loop dies"
    )
    log_level: LogLevel | None = Field(None, description="None keeps the level the CLI configured")

    @field_validator("oom_inject_steps", mode="before")
    @classmethod
    def _split_steps(cls, value: object) -> object:
        """Accept '3,7' (environment variables) as well as a list of ints."""
        if isinstance(value, str):
            return tuple(int(part) for part in value.replace(" ", "").split(",") if part)
        if isinstance(value, int):
            return (value,)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        """Log levels are case-insensitive."""
        return value.upper() if isinstance(value, str) else value

    def api_key_value(self) -> str | None:
        """The API key in clear text, or None when the server is open."""
        return self.api_key.get_secret_value() if self.api_key is not None else None
