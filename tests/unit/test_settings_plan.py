"""Settings -> the planner's PlanRequest (the one place serve hands settings to quant)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import ValidationError
from rich.table import Table

from fitserve.quant.plan import Plan, PlanRequest
from fitserve.quant.schemes import Precision
from fitserve.server.serve import PlannedServing, load_serving, plan_options, render_table
from fitserve.server.settings import Settings


def test_plan_options_pass_explicit_settings() -> None:
    settings = Settings(
        precision="nf4",
        max_model_len=512,
        min_concurrency=3,
        max_kv_tokens=4096,
        force=True,
        max_batch_size=4,
        max_prefill_tokens=256,
        prefer_fp32_on_cpu=False,
    )
    request = PlanRequest(model="m", **plan_options(settings, 2 * 1024**3))
    assert request.precision is Precision.NF4
    assert request.memory_budget_bytes == 2 * 1024**3
    assert (request.max_model_len, request.min_concurrency, request.max_kv_tokens) == (512, 3, 4096)
    assert request.force is True and request.prefer_fp32_on_cpu is False
    assert request.max_num_seqs == 4
    assert request.max_batch_tokens == 260


def test_unset_settings_keep_planner_defaults() -> None:
    request = PlanRequest(model="m", **plan_options(Settings(), None))
    defaults = PlanRequest(model="m")
    assert request.max_model_len == defaults.max_model_len
    assert request.max_kv_tokens == defaults.max_kv_tokens
    assert request.precision == "auto"
    assert request.prefer_fp32_on_cpu is defaults.prefer_fp32_on_cpu is True


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_the_planner_and_the_loader(trust: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(trust_remote_code=trust)
    assert PlanRequest(model="m", **plan_options(settings, None)).trust_remote_code is trust
    seen: dict[str, object] = {}

    def fake_load_model(plan: object, trust_remote_code: bool = False) -> Any:
        seen["trust_remote_code"] = trust_remote_code
        return SimpleNamespace(report=SimpleNamespace(to_table=lambda: "load report"))

    monkeypatch.setattr("fitserve.quant.load.load_model", fake_load_model)
    planned = PlannedServing(model_dir=Path("m"), served_model_name="m", plan=cast(Plan, object()))
    assert load_serving(planned, settings).planned is planned
    assert seen == {"trust_remote_code": trust}


def test_unknown_precision_is_a_plan_input_error() -> None:
    with pytest.raises(ValidationError):
        PlanRequest(model="m", **plan_options(Settings(precision="int3"), None))


def test_render_table_is_plain_text_for_the_log() -> None:
    table = Table("precision", "reason")
    table.add_row("int8", "int8 fits")
    text = render_table(table)
    assert "int8 fits" in text and "\x1b[" not in text


def test_default_batch_cap_comes_from_the_plan() -> None:
    from fitserve.server.serve import MAX_DEFAULT_BATCH_SIZE, default_max_batch_size

    # unset: the planner sizes the KV cache with its own default sequence count ...
    assert Settings().max_batch_size is None
    assert PlanRequest(model="m", **plan_options(Settings(), None)).max_num_seqs == PlanRequest(model="m").max_num_seqs
    # ... and the engine runs as many sequences as that cache admits (a block each), up to the largest bucket
    assert default_max_batch_size(16384, 16) == MAX_DEFAULT_BATCH_SIZE == 64
    assert default_max_batch_size(16 * 20, 16) == 20
    assert default_max_batch_size(8, 16) == 1
    request = PlanRequest(model="m", **plan_options(Settings(max_prefill_tokens=256), None))
    assert request.max_batch_tokens == 256 + MAX_DEFAULT_BATCH_SIZE


def test_compile_cache_lives_under_fitserve_home(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fitserve.server.serve import use_compile_cache

    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))
    env: dict[str, str] = {}
    assert use_compile_cache(env) == tmp_path / "compile" and env["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "compile"
    )
    assert use_compile_cache({"TORCHINDUCTOR_CACHE_DIR": "/elsewhere"}) == Path("/elsewhere")
