"""`fitserve plan` on the default model: the issue's acceptance budgets, exit codes, JSON keys, no weights read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fitserve.quant.budget import MIB, read_cpu_flags
from fitserve.quant.plan_cli import EXIT_BAD_INPUT, EXIT_NOTHING_FITS, EXIT_OK, add_plan_parser, run_plan


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fitserve")
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


# On a CPU without native bf16 the ladder starts with fp32 when it fits (issue 3 allows it; docs/memory-model.md
# section 6); `--no-prefer-fp32-on-cpu` gives the plain 16-bit -> INT8 -> 4-bit ladder the acceptance budgets name.
# On CPU the 4-bit rung is INT4 (torch's kernel); `--quant-backend bitsandbytes` gives bitsandbytes' NF4.
NATIVE_BF16 = bool(read_cpu_flags() & {"avx512_bf16", "amx_bf16"})
TOP = "bf16" if NATIVE_BF16 else "fp32"
SIXTEEN_BIT_LADDER = "--no-prefer-fp32-on-cpu"


def plan_json(model_dir: Path, budget: str, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict]:
    args = parse("--model", str(model_dir), "--memory-budget", budget, "--json", *extra)
    code = args.func(args)
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def needs(default_model_dir: Path) -> dict[str, int]:
    """Minimum total bytes per precision on the default model, from a generous plan."""
    from fitserve.quant.plan import PlanRequest, make_plan

    plan = make_plan(PlanRequest(model=default_model_dir, memory_budget_bytes=8 << 30))
    return {c.precision.value: c.total_bytes for c in plan.candidates}


def test_8gib_chooses_16_bit(default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan_json(default_model_dir, "8GiB", capsys, SIXTEEN_BIT_LADDER)
    assert code == EXIT_OK and out["chosen"] == "bf16" and out["device"] == "cpu"
    assert out["budget_bytes"] == 8 << 30 and out["reason"]
    assert [c["precision"] for c in out["candidates"]] == ["bf16", "int8", "int4"]
    assert [c["backend"] for c in out["candidates"]] == [None, "torch", "torch"]
    for cand in out["candidates"]:
        assert {
            "precision",
            "weights_bytes",
            "kv_bytes_per_token",
            "overhead_bytes",
            "total_bytes",
            "fits",
            "kv_capacity_tokens",
        } <= set(cand)
        assert cand["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2


def test_8gib_by_default_chooses_fp32_on_a_cpu_without_native_bf16(
    default_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = plan_json(default_model_dir, "8GiB", capsys)
    assert code == EXIT_OK and out["chosen"] == TOP
    if not NATIVE_BF16:
        assert "fp32 compute is faster" in out["reason"]
        assert [c["precision"] for c in out["candidates"]] == ["fp32", "bf16", "int8", "int4"]
        fp32, bf16 = out["candidates"][:2]
        assert abs(fp32["weights_bytes"] - 2 * bf16["weights_bytes"]) < 1024  # twice the parameters (buffers once)
        assert fp32["kv_bytes_per_token"] == 2 * bf16["kv_bytes_per_token"]


def test_on_cpu_the_torch_rungs_need_less_than_16_bit(
    default_model_dir: Path, needs: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    """torch's weight-only load gives each Linear's checkpoint pages back as it quantizes it, so at the default
    context INT8/INT4 need less than a bf16 server, and a budget between bf16 and INT8 takes INT8."""
    assert needs["int4"] < needs["int8"] < needs["bf16"]
    code, out = plan_json(default_model_dir, str((needs["bf16"] + needs["int8"]) // 2), capsys, SIXTEEN_BIT_LADDER)
    assert code == EXIT_OK and out["chosen"] == "int8" and out["quant_backend"] == "torch"
    wide = {c["precision"]: c for c in out["candidates"]}
    assert not wide["bf16"]["fits"] and wide["int8"]["fits"]
    assert wide["int8"]["load_peak_bytes"] <= wide["int8"]["total_bytes"]


LONG = ("--max-model-len", "8192", "--min-concurrency", "8", "--max-num-seqs", "8")


def test_long_contexts_make_the_cpu_ladder_choose_torch_int8(
    default_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where the KV cache, not the load, sets the minimum, the torch INT8 rung fits where bf16 does not."""
    code, out = plan_json(default_model_dir, "8GiB", capsys, SIXTEEN_BIT_LADDER, *LONG)
    wide = {c["precision"]: c for c in out["candidates"]}
    assert wide["int8"]["load_peak_bytes"] < wide["int8"]["total_bytes"] < wide["bf16"]["total_bytes"]
    budget = (wide["bf16"]["total_bytes"] + wide["int8"]["total_bytes"]) // 2
    code, out = plan_json(default_model_dir, str(budget), capsys, SIXTEEN_BIT_LADDER, *LONG)
    assert code == EXIT_OK and out["chosen"] == "int8" and out["quant_backend"] == "torch"
    assert "torch's weight-only kernel" in out["reason"]


@pytest.mark.parametrize(
    ("precision", "backend"), [("int8", "torch"), ("int4", "torch"), ("int8", "bitsandbytes"), ("nf4", "bitsandbytes")]
)
def test_a_forced_quantized_precision_fits_at_its_minimum(
    default_model_dir: Path, capsys: pytest.CaptureFixture[str], precision: str, backend: str
) -> None:
    forced = ("--precision", precision, "--quant-backend", backend)
    code, out = plan_json(default_model_dir, "8GiB", capsys, *forced)
    minimum = out["candidates"][0]["total_bytes"]
    code, out = plan_json(default_model_dir, str(minimum), capsys, *forced)
    assert code == EXIT_OK and out["chosen"] == precision and out["kv_capacity_tokens"] >= 2048
    assert out["quant_backend"] == backend
    code, out = plan_json(default_model_dir, str(minimum - 1), capsys, *forced)
    assert code == EXIT_NOTHING_FITS and out["chosen"] is None


def test_bitsandbytes_backend_keeps_nf4_on_cpu(default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan_json(default_model_dir, "8GiB", capsys, "--quant-backend", "bitsandbytes", SIXTEEN_BIT_LADDER)
    assert code == EXIT_OK and [c["precision"] for c in out["candidates"]] == ["bf16", "int8", "nf4"]
    assert [c["backend"] for c in out["candidates"]] == [None, "bitsandbytes", "bitsandbytes"]
    code, out = plan_json(default_model_dir, "8GiB", capsys, "--precision", "nf4")  # the old spelling still works
    assert code == EXIT_OK and out["chosen"] == "nf4" and out["quant_backend"] == "bitsandbytes"


def test_40mib_exits_3_with_the_message(
    default_model_dir: Path, needs: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--model", str(default_model_dir), "--memory-budget", "40MiB")
    assert run_plan(args) == EXIT_NOTHING_FITS
    err = capsys.readouterr().err
    assert "nothing fits" in err and "int4" in err and str(needs["int4"]) in err
    assert str(40 * MIB) in err and "short by" in err and str(needs["int4"] - 40 * MIB) in err
    assert "--max-model-len" in err and "--memory-budget" in err and "GPU" in err


def test_40mib_json_has_chosen_null(default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = plan_json(default_model_dir, "40MiB", capsys)
    assert code == EXIT_NOTHING_FITS and out["chosen"] is None and not any(c["fits"] for c in out["candidates"])


@pytest.mark.parametrize(
    "argv",
    [
        ("--memory-budget", "lots"),
        ("--memory-budget=-1GiB",),
        ("--max-model-len", "0"),
        ("--max-model-len", "100000"),
        ("--device", "tpu"),
        ("--precision", "gptq"),
    ],
)
def test_bad_input_exits_2(default_model_dir: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    args = parse("--model", str(default_model_dir), *argv)
    assert run_plan(args) == EXIT_BAD_INPUT
    assert "error" in capsys.readouterr().err


def test_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--model", str(tmp_path), "--json")  # a directory without config.json
    assert run_plan(args) == EXIT_BAD_INPUT
    assert "config.json" in json.loads(capsys.readouterr().out)["error"]["message"]


def test_human_output_has_table_and_verdict(default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("--model", str(default_model_dir), "--memory-budget", "8GiB")
    assert run_plan(args) == EXIT_OK
    out = capsys.readouterr().out
    assert "memory plan" in out and "int4" in out and f"{TOP.upper()} on cpu" in out


def test_plan_reads_no_weights(
    default_model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FITSERVE_HOME", str(tmp_path))  # cold shape cache: the skeleton is really built
    import safetensors
    import safetensors.torch
    import torch
    import transformers.modeling_utils  # imported first: it binds `safe_open` by name, patched below and restored

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("fitserve plan must not read weights")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(transformers.modeling_utils, "safe_open", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    code, out = plan_json(default_model_dir, "8GiB", capsys)
    assert code == EXIT_OK and out["chosen"] == TOP
    assert list((tmp_path / "shapes").glob("*.json"))  # built, then cached
