"""The Grafana dashboard only queries series fitserve exports, and shows what the issue asks for."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from fitserve.server.metrics import METRICS, exposed_sample_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fitserve.json"
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:$])fitserve_[A-Za-z0-9_:]*")


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def walk_exprs(node: object) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets' `expr` and template variables' queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            is_expr = key in ("expr", "definition") and isinstance(value, str)
            is_metric_query = key == "query" and isinstance(value, str) and "fitserve_" in value
            if is_expr or is_metric_query:
                yield value
            else:
                yield from walk_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_exprs(item)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (label values and strings are ignored)."""
    return set(_METRIC_NAME.findall(_STRING_LITERAL.sub('""', expr)))


def test_extractor_handles_suffixes_and_ignores_label_values() -> None:
    exported = exposed_sample_names()
    assert metric_names('rate(fitserve_requests_total{status="fitserve_nope"}[1m])') == {"fitserve_requests_total"}
    assert metric_names("histogram_quantile(0.5, rate(fitserve_time_to_first_token_seconds_bucket[1m]))") <= exported
    # A histogram's bare name, a counter without `_total`, or a typo is not a series fitserve exports.
    assert not metric_names("rate(fitserve_time_to_first_token_seconds[1m])") <= exported
    assert not metric_names("rate(fitserve_generation_tokens[1m])") <= exported
    assert not metric_names("fitserve_kv_cache_usage") <= exported


def test_every_dashboard_query_uses_exported_metrics() -> None:
    exprs = list(walk_exprs(load_dashboard()))
    assert len(exprs) >= 20
    exported = exposed_sample_names()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"query selects no fitserve metric: {expr}"
        unknown = names - exported
        assert not unknown, f"{expr!r} uses series fitserve does not export: {sorted(unknown)}"


def test_dashboard_covers_the_issue_panels() -> None:
    exprs = list(walk_exprs(load_dashboard()))
    used = set().union(*(metric_names(expr) for expr in exprs))
    for name in (
        "fitserve_memory_budget_bytes",
        "fitserve_model_weights_bytes",
        "fitserve_plan_predicted_bytes",
        "fitserve_device_memory_used_bytes",
        "fitserve_kv_cache_usage_ratio",
        "fitserve_requests_running",
        "fitserve_requests_waiting",
        "fitserve_oom_events_total",
    ):
        assert name in used, name
    for histogram in ("fitserve_time_to_first_token_seconds", "fitserve_inter_token_latency_seconds"):
        quantiles = [e for e in exprs if "histogram_quantile" in e and f"{histogram}_bucket" in e]
        assert len(quantiles) >= 2, f"{histogram} needs quantile queries"
    assert any(re.search(r"rate\(fitserve_generation_tokens_total", e) for e in exprs), "tokens/s panel missing"


def test_memory_ledger_panel_stacks_components_against_an_unstacked_budget() -> None:
    panels = {panel["title"]: panel for panel in load_dashboard()["panels"]}
    ledger = panels["Memory ledger vs budget"]
    assert ledger["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    exprs = [target["expr"] for target in ledger["targets"]]
    assert any("fitserve_memory_budget_bytes" in e for e in exprs)
    assert any('component="kv_cache"' in e for e in exprs)
    budget_override = next(o for o in ledger["fieldConfig"]["overrides"] if "budget" in o["matcher"]["options"])
    stacking = next(p["value"] for p in budget_override["properties"] if p["id"] == "custom.stacking")
    assert stacking["mode"] == "none"


def test_panels_are_well_formed() -> None:
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for panel in panels:
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
        if panel["type"] != "row":
            assert panel.get("description"), f"panel {panel['title']!r} has no description"


def test_every_exported_metric_is_documented() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    missing = [spec.name for spec in METRICS if f"`{spec.name}`" not in docs]
    assert not missing, f"docs/metrics.md does not describe {missing}"
