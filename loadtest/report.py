"""Results output: a rich summary table, results.json, results.csv and PNG plots."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fitserve.loadtest.sweep import LevelResult, MaxBatchVerdict, SweepState

logger = logging.getLogger(__name__)

_GIB = 1024**3


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def summary_table(state: SweepState, title: str = "fitserve loadtest") -> Table:
    """One row per level: requests, throughput, latency percentiles, server peaks, verdict."""
    table = Table(title=title)
    for col in (
        "level",
        "ok",
        "failed",
        "out tok/s",
        "req/s",
        "TTFT p50/p90/p99 ms",
        "ITL p50/p90/p99 ms",
        "e2e p50/p90/p99 ms",
        "peak mem GiB",
        "peak KV",
        "OOM",
        "preempt",
        "verdict",
    ):
        table.add_column(col, justify="left" if col in ("level", "verdict") else "right")
    for lv in state.levels:
        m = lv.metrics
        failed = ", ".join(f"{k}:{n}" for k, n in sorted(lv.failures.items())) or "0"
        verdict = (
            "interrupted"
            if lv.interrupted
            else "pass"
            if lv.passed
            else ", ".join(f.reason.value for f in lv.findings) or "fail"
        )
        table.add_row(
            lv.spec.label,
            str(lv.ok),
            failed,
            f"{lv.output_tokens_per_s:.1f}",
            f"{lv.requests_per_s:.2f}",
            "/".join(_ms(x) for x in (lv.ttft.p50, lv.ttft.p90, lv.ttft.p99)),
            "/".join(_ms(x) for x in (lv.itl.p50, lv.itl.p90, lv.itl.p99)),
            "/".join(_ms(x) for x in (lv.e2e.p50, lv.e2e.p90, lv.e2e.p99)),
            _num(m.peak_memory_used_bytes / _GIB if m and m.peak_memory_used_bytes is not None else None),
            _num(m.peak_kv_usage_ratio if m else None),
            _num(m.oom_events_delta if m else None, "{:g}"),
            _num(m.preemptions_delta if m else None, "{:g}"),
            verdict,
        )
    return table


def verdict_lines(v: MaxBatchVerdict) -> list[str]:
    """The --find-max-batch verdict in words."""
    lines = [f"Largest passing concurrency: {v.largest_passing}"]
    if v.first_failing is None:
        lines.append(f"No level failed up to --max-concurrency {v.max_concurrency}.")
    else:
        lines.append(
            f"Concurrency {v.first_failing} failed: " + "; ".join(f"{f.reason.value} ({f.detail})" for f in v.reasons)
        )
    if v.predicted_capacity is not None:
        parts = []
        if v.predicted_kv_capacity is not None:
            parts.append(
                f"KV capacity {v.kv_capacity_tokens} tokens / {v.request_tokens} tokens per request = "
                f"{v.predicted_kv_capacity}"
            )
        if v.server_max_batch_size is not None:
            parts.append(f"server max batch {v.server_max_batch_size}")
        lines.append(f"Server's prediction: {v.predicted_capacity} ({'; '.join(parts)})")
    return lines


def print_summary(state: SweepState, console: Console) -> None:
    """Print the table and, for --find-max-batch, the verdict."""
    if state.levels:
        console.print(summary_table(state))
    else:
        console.print("No level completed.")
    if state.verdict is not None:
        for line in verdict_lines(state.verdict):
            console.print(line)
    if state.interrupted:
        console.print("[yellow]Interrupted: results are partial.[/yellow]")


def results_dict(state: SweepState, config: dict[str, Any]) -> dict[str, Any]:
    """Everything for results.json."""
    return {
        "mode": state.mode.value,
        "config": config,
        "interrupted": state.interrupted,
        "levels": [lv.as_dict() for lv in state.levels],
        "verdict": state.verdict.as_dict() if state.verdict else None,
    }


def write_results(state: SweepState, config: dict[str, Any], out_dir: Path, plots: bool = True) -> list[Path]:
    """Write results.json, results.csv and (unless `plots` is False) the PNG plots; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results_dict(state, config), indent=2) + "\n", encoding="utf-8")
    csv_path = out_dir / "results.csv"
    write_csv(state.levels, csv_path)
    written = [json_path, csv_path]
    if plots and state.levels:
        written += write_plots(state.levels, out_dir)
    return written


def csv_row(lv: LevelResult) -> dict[str, Any]:
    """One flat CSV row per level."""
    row: dict[str, Any] = {
        "label": lv.spec.label,
        "concurrency": lv.spec.concurrency,
        "rate_rps": lv.spec.rate_rps,
        "duration_s": round(lv.duration_s, 4),
        "requests_ok": lv.ok,
        "requests_failed": lv.failed_requests,
        "failures_by_status": ";".join(f"{k}={n}" for k, n in sorted(lv.failures.items())),
        "output_tokens": lv.output_tokens,
        "output_tokens_per_s": round(lv.output_tokens_per_s, 3),
        "requests_per_s": round(lv.requests_per_s, 4),
    }
    for name, dist in (("ttft", lv.ttft), ("itl", lv.itl), ("e2e", lv.e2e)):
        for q in ("mean", "p50", "p90", "p95", "p99", "max"):
            value = getattr(dist, q)
            row[f"{name}_{q}_s"] = None if value is None else round(value, 6)
    m = lv.metrics
    for key in (
        "memory_budget_bytes",
        "peak_memory_used_bytes",
        "peak_kv_usage_ratio",
        "peak_running",
        "peak_waiting",
        "oom_events_delta",
        "preemptions_delta",
        "kv_capacity_tokens",
        "max_batch_size",
    ):
        row[key] = getattr(m, key) if m else None
    row["passed"] = lv.passed
    row["findings"] = ";".join(f.reason.value for f in lv.findings)
    return row


def write_csv(levels: list[LevelResult], path: Path) -> None:
    """results.csv: one row per level (a header only when there are none)."""
    rows = [csv_row(lv) for lv in levels]
    fields = list(rows[0]) if rows else ["label"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_plots(levels: list[LevelResult], out_dir: Path) -> list[Path]:
    """throughput_latency.png, and memory.png when the server exposed memory; x is concurrency or rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((lv for lv in levels if not lv.interrupted), key=_x)
    if not done:
        return []
    xlabel = "concurrency" if done[0].spec.concurrency is not None else "request rate (req/s)"
    xs = [_x(lv) for lv in done]
    written: list[Path] = []

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_tp.plot(xs, [lv.output_tokens_per_s for lv in done], marker="o", label="output tokens/s")
    ax_tp.set_xlabel(xlabel)
    ax_tp.set_ylabel("output tokens/s")
    ax_rps = ax_tp.twinx()
    ax_rps.plot(xs, [lv.requests_per_s for lv in done], "--", marker="s", color="tab:green", label="requests/s")
    ax_rps.set_ylabel("requests/s")
    ax_tp.legend(handles=ax_tp.get_lines() + ax_rps.get_lines(), loc="upper left", fontsize="small")
    ax_tp.set_title("Throughput")
    for lv in done:
        if not lv.passed:
            ax_tp.axvline(_x(lv), color="tab:red", alpha=0.25)
    for name, attr in (("TTFT", "ttft"), ("ITL", "itl"), ("e2e", "e2e")):
        for q, style in (("p50", "-"), ("p99", "--")):
            ys = [getattr(getattr(lv, attr), q) for lv in done]
            ax_lat.plot(xs, [None if y is None else y * 1000 for y in ys], style, marker="o", label=f"{name} {q}")
    ax_lat.set_xlabel(xlabel)
    ax_lat.set_ylabel("ms")
    ax_lat.set_yscale("log")
    ax_lat.set_title("Latency (red lines: failed levels)")
    ax_lat.legend(fontsize="small")
    fig.tight_layout()
    path = out_dir / "throughput_latency.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    mem = [
        (lv, lv.metrics.peak_memory_used_bytes)
        for lv in done
        if lv.metrics is not None and lv.metrics.peak_memory_used_bytes is not None
    ]
    if mem:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot(
            [_x(lv) for lv, _ in mem],
            [peak / _GIB for _, peak in mem],
            marker="o",
            label="peak memory used",
        )
        budgets = [
            lv.metrics.memory_budget_bytes
            for lv, _ in mem
            if lv.metrics is not None and lv.metrics.memory_budget_bytes is not None
        ]
        if budgets:
            ax.axhline(budgets[-1] / _GIB, color="tab:red", linestyle="--", label="memory budget")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GiB")
        top = max([peak for _, peak in mem] + budgets) / _GIB
        ax.set_ylim(0, top * 1.15)
        ax.set_title("Device memory vs load")
        ax.legend()
        fig.tight_layout()
        path = out_dir / "memory.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _x(lv: LevelResult) -> float:
    return float(lv.spec.concurrency if lv.spec.concurrency is not None else lv.spec.rate_rps or 0.0)
