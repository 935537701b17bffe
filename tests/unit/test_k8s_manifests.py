"""deploy/k8s: the shipped manifests pass the offline check; broken ones fail it, each for the reason it is broken.

Every case below takes one shipped manifest, breaks one thing, and checks it together with the other shipped
manifests, so that cross-file rules (selectors, scale targets, adapter metrics) see the real neighbours.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pydantic
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
FIXTURES = ROOT / "tests" / "fixtures" / "k8s"
sys.path.insert(0, str(K8S))

import check_manifests  # noqa: E402
from manifest_rules import ProjectFacts  # noqa: E402

Mutation = Callable[[dict], None]


@pytest.fixture(scope="module")
def facts() -> ProjectFacts:
    return ProjectFacts.load(ROOT)


def shipped_files() -> list[Path]:
    return check_manifests.manifest_files([K8S])


def problems_with(replacement: Path, facts: ProjectFacts, replaces: str | None = None) -> list[str]:
    """Problems reported at `replacement` when it is checked with the shipped files (less the one it replaces)."""
    files = [f for f in shipped_files() if f.relative_to(K8S).as_posix() != replaces] + [replacement]
    _, problems = check_manifests.check(files, facts)
    return [str(p) for p in problems if p.where.startswith(str(replacement))]


def broken_copy(tmp_path: Path, name: str, mutate: Mutation) -> Path:
    """A copy of the shipped file deploy/k8s/<name> whose first object has one thing changed by `mutate`."""
    documents = list(yaml.safe_load_all((K8S / name).read_text()))
    mutate(documents[0])
    path = tmp_path / Path(name).name
    path.write_text(yaml.safe_dump_all(documents))
    return path


def fitserve_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def set_env(container: dict, name: str, entry: dict) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name] + [{"name": name, **entry}]


def adapter_rules(config_map: dict) -> dict:
    return yaml.safe_load(config_map["data"]["config.yaml"])


def rewrite_adapter_rules(config_map: dict, change: Callable[[dict], None]) -> None:
    rules = adapter_rules(config_map)
    change(rules)
    config_map["data"]["config.yaml"] = yaml.safe_dump(rules)


def serve_applications(rayservice: dict) -> list:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]


def set_application_args(rayservice: dict, change: Callable[[dict], None]) -> None:
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    change(serve_config["applications"][0]["args"])
    rayservice["spec"]["serveConfigV2"] = yaml.safe_dump(serve_config)


def ray_worker(rayservice: dict) -> dict:
    return rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def test_shipped_manifests_pass_and_cover_the_issue(facts: ProjectFacts) -> None:
    manifests, problems = check_manifests.check(shipped_files(), facts)
    assert [str(p) for p in problems] == []
    kinds = {m.kind for m in manifests}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds
    assert {"ScaledObject", "PodMonitor", "RayService", "ScrapeConfig"} <= kinds
    deployment = next(m for m in manifests if m.kind == "Deployment")
    container = fitserve_container(deployment.body)
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_every_shipped_manifest_is_documented() -> None:
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    missing = [
        f.relative_to(K8S).as_posix() for f in shipped_files() if f"`{f.relative_to(K8S).as_posix()}`" not in docs
    ]
    assert missing == [], f"docs/kubernetes.md does not describe {missing}"


def test_every_custom_resource_has_a_committed_schema() -> None:
    for schema in check_manifests.CRD_SCHEMAS.values():
        assert (check_manifests.SCHEMA_DIR / schema).is_file(), schema
    sources = (check_manifests.SCHEMA_DIR / "SOURCES.md").read_text()
    assert all(f"`{name}`" in sources for name in check_manifests.CRD_SCHEMAS.values())


@pytest.mark.parametrize(
    ("fixture", "reason"),
    [
        ("deployment-misspelt-field.yaml", "Additional properties are not allowed ('readinesProbe' was unexpected)"),
        ("rayservice-wrong-type.yaml", "maxReplicas: 'four' is not of type 'integer'"),
        ("deployment-wrong-probes.yaml", "readinessProbe must GET /ready, not /health"),
        ("deployment-wrong-probes.yaml", "FITSERVE_API_KEY must come from a Secret"),
        ("hpa-unexported-metric.yaml", "metric fitserve_kv_cache_usage is published by no prometheus-adapter rule"),
    ],
)
def test_broken_fixture_fails_for_its_reason(fixture: str, reason: str, facts: ProjectFacts) -> None:
    found = problems_with(FIXTURES / fixture, facts)
    assert any(reason in problem for problem in found), found


def test_the_schema_valid_fixture_fails_only_for_its_two_reasons(facts: ProjectFacts) -> None:
    found = problems_with(FIXTURES / "deployment-wrong-probes.yaml", facts)
    assert len(found) == 2, found
    assert any("readinessProbe must GET /ready" in p for p in found), found
    assert any("FITSERVE_API_KEY must come from a Secret" in p for p in found), found


def test_command_line_fails_on_a_broken_fixture_and_passes_the_shipped_manifests() -> None:
    script = str(K8S / "check_manifests.py")
    broken = subprocess.run(
        [sys.executable, script, str(FIXTURES / "rayservice-wrong-type.yaml")], capture_output=True, text=True
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "is not of type 'integer'" in broken.stdout
    shipped = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd="/")
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    assert shipped.stdout.startswith("ok: ")


def test_malformed_shapes_are_reported_not_raised(tmp_path: Path, facts: ProjectFacts) -> None:
    path = tmp_path / "deployment.yaml"
    path.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n"
        "spec: {selector: {}, template: {spec: {containers: [{name: c, image: fitserve:0.1.0, env: 3}]}}}\n"
    )
    _, problems = check_manifests.check([path], facts)
    messages = [str(p) for p in problems]
    assert any("is not of type 'array'" in m for m in messages), messages
    assert any(m.startswith("(project rules): not run") for m in messages), messages


def test_a_kind_without_a_schema_is_an_error(tmp_path: Path, facts: ProjectFacts) -> None:
    path = tmp_path / "widget.yaml"
    path.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n")
    assert any("no schema for example.com/v1 Widget" in p for p in problems_with(path, facts))


def _drop_gpu(container: dict) -> None:
    del container["resources"]["limits"]["nvidia.com/gpu"]
    del container["resources"]["requests"]["nvidia.com/gpu"]


# (shipped manifest, mutation, a phrase the check must report at the broken copy)
CASES: dict[str, tuple[str, Mutation, str]] = {
    "deployment replicas is a string": (
        "plain/deployment.yaml",
        lambda d: d["spec"].update(replicas="2"),
        "spec.replicas: '2' is not of type 'integer'",
    ),
    "readiness on /health": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d)["readinessProbe"]["httpGet"].update(path="/health"),
        "readinessProbe must GET /ready",
    ),
    "liveness on /ready": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d)["livenessProbe"]["httpGet"].update(path="/ready"),
        "livenessProbe must GET /health",
    ),
    "no startup probe": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).pop("startupProbe"),
        "startupProbe must be an httpGet on /health",
    ),
    "probe on another port": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d)["readinessProbe"]["httpGet"].update(port=9000),
        "readinessProbe port 9000 is not the served port 8000",
    ),
    "container port is not the Dockerfile's": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d)["ports"][0].update(containerPort=8080),
        "declares no containerPort 8000",
    ),
    "unknown serve flag": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).update(args=["--gpu-memory-utilization", "0.9"]),
        "are not valid `fitserve serve` flags",
    ),
    "serve on loopback": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).update(args=["--host", "127.0.0.1"]),
        "args must keep --host 0.0.0.0 --port 8000",
    ),
    "misspelt setting variable": (
        "plain/deployment.yaml",
        lambda d: set_env(fitserve_container(d), "FITSERVE_MAX_BATCH", {"value": "8"}),
        "env FITSERVE_MAX_BATCH is no fitserve setting",
    ),
    "API key missing": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).update(env=[e for e in fitserve_container(d)["env"] if "API" not in e["name"]]),
        "env FITSERVE_API_KEY is missing",
    ),
    "model cache not mounted": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).pop("volumeMounts"),
        "FITSERVE_HOME=/models is not a mounted volume",
    ),
    "rayservice head without the model cache": (
        "kuberay/rayservice.yaml",
        lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(env=[]),
        "env FITSERVE_HOME must name the mounted model cache",
    ),
    "no GPU": (
        "plain/deployment.yaml",
        lambda d: _drop_gpu(fitserve_container(d)),
        "nvidia.com/gpu must be at least 1",
    ),
    "image tagged latest": (
        "plain/deployment.yaml",
        lambda d: fitserve_container(d).update(image="fitserve:latest"),
        "must be tagged with the package version 0.1.0",
    ),
    "claim of an undefined volume": (
        "plain/deployment.yaml",
        lambda d: d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].update(claimName="models"),
        "claims models, which is not defined",
    ),
    "fetch job runs an unknown subcommand": (
        "plain/model-fetch-job.yaml",
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(command=["fitserve", "model", "download"]),
        "invalid choice: 'download'",
    ),
    "service selects nothing": (
        "plain/service.yaml",
        lambda d: d["spec"]["selector"].update({"app.kubernetes.io/name": "fitserv"}),
        "matches no fitserve pod template",
    ),
    "service targets an unknown port": (
        "plain/service.yaml",
        lambda d: d["spec"]["ports"][0].update(targetPort="web"),
        "port 'web' is not a port of the selected containers",
    ),
    "podmonitor misspelt field": (
        "monitoring/podmonitor.yaml",
        lambda d: d["spec"].update(podMetricEndpoints=d["spec"].pop("podMetricsEndpoints")),
        "('podMetricEndpoints' was unexpected)",
    ),
    "podmonitor scrapes an unknown port": (
        "monitoring/podmonitor.yaml",
        lambda d: d["spec"]["podMetricsEndpoints"][0].update(port="metrics"),
        "port 'metrics' is not a port of the selected containers",
    ),
    "scrape config of another rayservice": (
        "monitoring/rayservice-scrapeconfig.yaml",
        lambda d: d["spec"]["httpSDConfigs"][0].update(url="http://llm-serve-svc.fitserve.svc:8000/metrics/targets"),
        "is the Serve service of RayService llm, not defined",
    ),
    "custom resource with misspelt metadata": (
        "kuberay/rayservice.yaml",
        lambda d: d["metadata"].update(label={"a": "b"}),
        "metadata: Additional properties are not allowed ('label' was unexpected)",
    ),
    "scrape config misspelt field": (
        "monitoring/rayservice-scrapeconfig.yaml",
        lambda d: d["spec"].update(httpSdConfigs=d["spec"].pop("httpSDConfigs")),
        "('httpSdConfigs' was unexpected)",
    ),
    "hpa scales an undefined deployment": (
        "autoscaling/hpa.yaml",
        lambda d: d["spec"]["scaleTargetRef"].update(name="fitserve-gpu"),
        "scaleTargetRef Deployment/fitserve-gpu is not defined",
    ),
    "hpa misspelt target field": (
        "autoscaling/hpa.yaml",
        lambda d: d["spec"]["metrics"][0]["pods"]["target"].update(averagevalue="1"),
        "('averagevalue' was unexpected)",
    ),
    "adapter rule reads an unexported series": (
        "autoscaling/prometheus-adapter-rules.yaml",
        lambda d: rewrite_adapter_rules(
            d, lambda r: r["rules"][0].update(seriesQuery='fitserve_kv_usage{namespace!="",pod!=""}')
        ),
        "adapter rule uses fitserve_kv_usage, which fitserve does not export",
    ),
    "adapter rule misspelt key": (
        "autoscaling/prometheus-adapter-rules.yaml",
        lambda d: rewrite_adapter_rules(d, lambda r: r["rules"][0].update(metricQuery="x")),
        "('metricQuery' was unexpected)",
    ),
    "keda query on an unexported series": (
        "autoscaling/keda-scaledobject.yaml",
        lambda d: d["spec"]["triggers"][0]["metadata"].update(query="sum(fitserve_kv_cache_usage)"),
        "uses fitserve_kv_cache_usage, not exported",
    ),
    "keda max replicas is a string": (
        "autoscaling/keda-scaledobject.yaml",
        lambda d: d["spec"].update(maxReplicaCount="4"),
        "maxReplicaCount: '4' is not of type 'integer'",
    ),
    "rayservice misspelt field in a pod template": (
        "kuberay/rayservice.yaml",
        lambda d: ray_worker(d).update(imagePulPolicy="Always"),
        "('imagePulPolicy' was unexpected)",
    ),
    "rayservice imports another application": (
        "kuberay/rayservice.yaml",
        lambda d: d["spec"].update(serveConfigV2="applications:\n  - name: x\n    import_path: app:build\n"),
        "does not import a fitserve module",
    ),
    "rayservice without a GPU worker": (
        "kuberay/rayservice.yaml",
        lambda d: _drop_gpu(ray_worker(d)),
        "no worker group has limits.nvidia.com/gpu",
    ),
    "rayservice settings with a misspelt field": (
        "kuberay/rayservice.yaml",
        lambda d: set_application_args(d, lambda a: a["settings"].update(max_batch=8)),
        "args.settings has no fitserve setting ['max_batch']",
    ),
    "rayservice settings with a bad value": (
        "kuberay/rayservice.yaml",
        lambda d: set_application_args(d, lambda a: a["settings"].update(max_batch_size=0)),
        "args.settings.max_batch_size: Input should be greater than or equal to 1",
    ),
    "rayservice replicas on CPU": (
        "kuberay/rayservice.yaml",
        lambda d: set_application_args(d, lambda a: a.update(num_gpus=0)),
        "args.num_gpus 0 must be above 0 and at most a worker's 1 GPUs",
    ),
    "rayservice scales past its workers": (
        "kuberay/rayservice.yaml",
        lambda d: set_application_args(d, lambda a: a["autoscaling"].update(max_replicas=8)),
        "8 replicas of 1 GPU exceed the workers' 4 GPUs",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_broken_manifest_fails_for_its_reason(case: str, tmp_path: Path, facts: ProjectFacts) -> None:
    name, mutate, reason = CASES[case]
    found = problems_with(broken_copy(tmp_path, name, mutate), facts, replaces=name)
    assert any(reason in problem for problem in found), found


class StandInScaleoutConfig(pydantic.BaseModel):
    """Where server/scaleout is absent: a model with ScaleoutConfig's strictness (unknown keys rejected)."""

    model_config = pydantic.ConfigDict(extra="allow")
    num_gpus: float = pydantic.Field(0.0, ge=0)
    router: Literal["memory", "default"] = "memory"


def test_rayservice_follows_the_ray_serve_config_its_args_model_and_the_ray_pin(
    tmp_path: Path, facts: ProjectFacts
) -> None:
    """With deploy/ray/serve-config.yaml, ScaleoutConfig and a pinned `ray` extra, the RayService must match all."""
    rayservice = yaml.safe_load((K8S / "kuberay" / "rayservice.yaml").read_text())
    reference = [{"name": "fitserve", "route_prefix": "/", "import_path": "fitserve.server.scaleout.app:build_app"}]
    model = facts.scaleout_config or StandInScaleoutConfig
    same = dataclasses.replace(
        facts, serve_config={"applications": reference}, ray_version="2.60.0", scaleout_config=model
    )
    path = tmp_path / "rayservice.yaml"
    path.write_text(yaml.safe_dump(rayservice))
    assert problems_with(path, same, replaces="kuberay/rayservice.yaml") == []

    moved = copy.deepcopy(reference)
    moved[0]["route_prefix"] = "/v2"
    differing = dataclasses.replace(same, serve_config={"applications": moved}, ray_version="2.61.0")
    found = problems_with(path, differing, replaces="kuberay/rayservice.yaml")
    assert any("route_prefix differs from deploy/ray/serve-config.yaml (/v2)" in p for p in found), found
    assert any("rayVersion 2.60.0 is not the pinned ray 2.61.0" in p for p in found), found

    renamed = dataclasses.replace(same, serve_config={"applications": [{**reference[0], "name": "llm"}]})
    found = problems_with(path, renamed, replaces="kuberay/rayservice.yaml")
    assert any("application fitserve: is not an application of deploy/ray/serve-config.yaml" in p for p in found)

    set_application_args(rayservice, lambda a: a.update(router="fastest"))
    path.write_text(yaml.safe_dump(rayservice))
    found = problems_with(path, same, replaces="kuberay/rayservice.yaml")
    assert any("args.router" in p and "(ScaleoutConfig)" in p for p in found), found
