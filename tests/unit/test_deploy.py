"""deploy/: compose, Prometheus and Grafana provisioning parse and point at files and services that exist."""

from __future__ import annotations

import re
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
    assert any(port.endswith(":8000:8000") for port in fitserve["ports"])
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


# ${NAME:-default} and ${NAME:?error} as compose interpolates them
_WITH_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]+\}")


def default_value(text: str) -> str:
    """`text` with every ${NAME:-default} replaced by its default (what compose uses without deploy/.env)."""
    return _WITH_DEFAULT.sub(lambda match: match.group(2), text)


def test_every_port_is_published_on_loopback_by_default() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            host_ip, host_port, container_port = default_value(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond this machine by default"
            assert host_port == container_port


def test_the_api_key_and_grafana_password_come_from_the_env_file_and_are_required() -> None:
    services = compose()["services"]
    api_key = services["fitserve"]["environment"]["FITSERVE_API_KEY"]
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert _REQUIRED.fullmatch(api_key) and _REQUIRED.fullmatch(password), (api_key, password)
    assert "admin" not in password


def test_env_example_documents_every_variable_compose_reads() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    used = {m.group(1) for m in _WITH_DEFAULT.finditer(text)} | {m.group(1) for m in _REQUIRED.finditer(text)}
    example = (DEPLOY / ".env.example").read_text()
    documented = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
    assert used == documented
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().split()
