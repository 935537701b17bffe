"""deploy/ray/ (Serve config, Prometheus config) and the dashboard's replica variable."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from fitserve.server.scaleout.config import ScaleoutConfig

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_names_the_stable_import_path_and_valid_args() -> None:
    config = yaml.safe_load((ROOT / "deploy/ray/serve-config.yaml").read_text())
    (app,) = config["applications"]
    assert app["import_path"] == "fitserve.server.scaleout.app:build_app"
    parsed = ScaleoutConfig.model_validate(app["args"])
    assert parsed.autoscaling is not None and parsed.autoscaling.to_config().max_replicas >= 1


def test_prometheus_discovers_replicas_through_the_ingress() -> None:
    config = yaml.safe_load((ROOT / "deploy/ray/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (sd,) = jobs["fitserve-replicas"]["http_sd_configs"]
    assert sd["url"].endswith("/metrics/targets")
    assert "fitserve-ingress" in jobs


def test_dashboard_filters_every_job_query_by_replica() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/fitserve.json").read_text())
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    assert variables["replica"]["allValue"] == ".*"  # also matches a single server, whose series have no replica

    def exprs(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "expr"] + [e for v in node.values() for e in exprs(v)]
        if isinstance(node, list):
            return [e for item in node for e in exprs(item)]
        return []

    queries = [expr for expr in exprs(dashboard["panels"]) if 'job=~"$job"' in expr]
    assert queries and all('replica=~"$replica"' in expr for expr in queries)
