"""Settings: defaults, FITSERVE_* environment, and CLI flags overriding the environment."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from fitserve.server.serve_cli import add_serve_parser, settings_from_args
from fitserve.server.settings import DEFAULT_MAX_BODY_BYTES, LogLevel, Settings


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="INFO")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    return parser.parse_args(argv)


def test_secure_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FITSERVE_HOST", "FITSERVE_API_KEY", "FITSERVE_TRUST_REMOTE_CODE", "FITSERVE_PORT"):
        monkeypatch.delenv(key, raising=False)
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.trust_remote_code is False
    assert settings.api_key is None
    assert settings.max_waiting == 256
    assert settings.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 1024 * 1024
    assert settings.oom_inject_steps == ()


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FITSERVE_PORT", "9001")
    monkeypatch.setenv("FITSERVE_API_KEY", "sekret")
    monkeypatch.setenv("FITSERVE_OOM_INJECT_STEPS", "3, 7")
    monkeypatch.setenv("FITSERVE_LOG_LEVEL", "debug")
    settings = Settings()
    assert settings.port == 9001
    assert settings.api_key_value() == "sekret"
    assert "sekret" not in repr(settings)
    assert settings.oom_inject_steps == (3, 7)
    assert settings.log_level is LogLevel.DEBUG


def test_cli_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FITSERVE_PORT", "9001")
    monkeypatch.setenv("FITSERVE_MAX_WAITING", "5")
    args = _parse(["serve", "--port", "9100", "--max-batch-size", "4", "--force", "--shutdown-timeout", "2.5"])
    settings = settings_from_args(args)
    assert settings.port == 9100  # flag beats env
    assert settings.max_waiting == 5  # env applies where no flag was given
    assert settings.max_batch_size == 4
    assert settings.force is True
    assert settings.shutdown_timeout_s == 2.5
    assert args.func.__name__ == "run_serve"


def test_prefix_caching_is_on_unless_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_args(_parse(["serve"])).enable_prefix_caching is True
    assert settings_from_args(_parse(["serve", "--no-prefix-caching"])).enable_prefix_caching is False
    monkeypatch.setenv("FITSERVE_ENABLE_PREFIX_CACHING", "false")
    assert settings_from_args(_parse(["serve"])).enable_prefix_caching is False


def test_fp32_preference_is_on_unless_switched_off() -> None:
    assert settings_from_args(_parse(["serve"])).prefer_fp32_on_cpu is True
    assert settings_from_args(_parse(["serve", "--no-prefer-fp32-on-cpu"])).prefer_fp32_on_cpu is False


def test_cli_flags_cover_the_issue_list() -> None:
    args = _parse(
        [
            "serve",
            "--model",
            "/m",
            "--served-model-name",
            "m",
            "--host",
            "0.0.0.0",
            "--api-key",
            "k",
            "--memory-budget",
            "2GiB",
            "--max-model-len",
            "512",
            "--min-concurrency",
            "2",
            "--precision",
            "int8",
            "--max-waiting",
            "8",
            "--max-body-bytes",
            "100",
            "--trust-remote-code",
            "--oom-inject-steps",
            "5",
            "--log-level",
            "warning",
            "--max-kv-tokens",
            "4096",
        ]
    )
    settings = settings_from_args(args)
    assert (settings.model, settings.served_model_name, settings.host) == ("/m", "m", "0.0.0.0")
    assert settings.api_key_value() == "k"
    assert (settings.memory_budget, settings.max_model_len, settings.min_concurrency) == ("2GiB", 512, 2)
    assert (settings.precision, settings.max_waiting, settings.max_body_bytes) == ("int8", 8, 100)
    assert settings.trust_remote_code is True
    assert settings.oom_inject_steps == (5,)
    assert settings.log_level is LogLevel.WARNING
    assert settings.max_kv_tokens == 4096


def test_invalid_values_are_rejected() -> None:
    with pytest.raises(ValidationError):
        Settings(port=70000)
    with pytest.raises(ValidationError):
        Settings(max_batch_size=0)


def test_compile_mode_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from fitserve.server.engine.compile_mode import CompileMode

    assert settings_from_args(_parse(["serve"])).compile_mode is CompileMode.AUTO
    assert settings_from_args(_parse(["serve", "--no-compile"])).compile_mode is CompileMode.OFF
    assert settings_from_args(_parse(["serve", "--compile-mode", "inductor"])).compile_mode is CompileMode.INDUCTOR
    monkeypatch.setenv("FITSERVE_COMPILE_MODE", "eager")
    assert settings_from_args(_parse(["serve"])).compile_mode is CompileMode.EAGER
    with pytest.raises(SystemExit):
        _parse(["serve", "--compile-mode", "fast"])
