"""deploy/: compose, Prometheus and Grafana provisioning parse and point at files and services that exist."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path resolved against deploy/, container path) for every bind mount of a service."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((DEPLOY / source).resolve(), target))
    return mounts


def test_compose_has_the_three_services_and_named_volumes() -> None:
    data = compose()
    services = data["services"]
    assert {"fitserve", "prometheus", "grafana"} <= set(services)
    declared = set(data.get("volumes") or {})
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"named volume {source} is not declared"


def test_fitserve_service_builds_the_dockerfile_and_reserves_a_gpu() -> None:
    fitserve = compose()["services"]["fitserve"]
    context = (DEPLOY / fitserve["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / fitserve["build"]["dockerfile"]).is_file()
    devices = fitserve["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "8000:8000" in fitserve["ports"]
    assert fitserve["environment"]["FITSERVE_HOME"] == "/models"
    assert any(v.split(":")[1] == "/models" for v in fitserve["volumes"])


def test_every_bind_mount_exists() -> None:
    for name, service in compose()["services"].items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_scrapes_the_fitserve_service() -> None:
    services = compose()["services"]
    mounts = dict((target, source) for source, target in bind_mounts(services["prometheus"]))
    config_flag = next(arg for arg in services["prometheus"]["command"] if arg.startswith("--config.file="))
    config_path = mounts[config_flag.split("=", 1)[1]]
    config = load_yaml(config_path)
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "fitserve")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    port = services["fitserve"]["ports"][0].split(":")[-1]
    assert f"fitserve:{port}" in targets


def test_grafana_provisioning_finds_the_datasource_and_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    provisioning = mounts["/etc/grafana/provisioning"]
    datasource = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    prometheus_port = compose()["services"]["prometheus"]["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    provider = load_yaml(provisioning / "dashboards" / "fitserve.yml")["providers"][0]
    dashboard_dir = PurePosixPath(provider["options"]["path"])
    in_dir = [target for target in mounts if PurePosixPath(target).parent == dashboard_dir]
    assert in_dir, f"nothing is mounted into the provisioned dashboard path {dashboard_dir}"
    assert mounts[in_dir[0]] == DEPLOY / "grafana" / "fitserve.json"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == in_dir[0]
