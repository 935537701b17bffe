"""fitserve's own rules for its Kubernetes manifests: what no schema knows (used by check_manifests.py).

The facts come from the repository, never from a copy: the version from pyproject.toml, the port and
entrypoint from the Dockerfile, the flags from the real `fitserve` argument parser, the FITSERVE_* variables
from `Settings`, the metric names from `server/metrics.py`, the Ray Serve application from
deploy/ray/serve-config.yaml and its `args` model `ScaleoutConfig` (where the checkout has them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from fitserve.server.cli import build_parser
from fitserve.server.metrics import exposed_sample_names
from fitserve.server.settings import Settings

READY_PATH = "/ready"
HEALTH_PATH = "/health"
GPU_RESOURCE = "nvidia.com/gpu"
API_KEY_ENV = "FITSERVE_API_KEY"
# Read by quant/model_store.py rather than Settings: the model cache root.
EXTRA_ENV = frozenset({"FITSERVE_HOME"})
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
_IMAGE = re.compile(r"(?:.*/)?(?P<name>[a-z0-9._-]+)(?::(?P<tag>[\w.-]+))?(?:@.+)?")
_METRIC = re.compile(r"(?<![A-Za-z0-9_:])fitserve_[A-Za-z0-9_:]*")
_PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RAY_PIN = re.compile(r"^ray(?:\[[\w,]+\])?==(?P<version>[\w.]+)$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong, and where: `file: Kind/name` (and a field when known)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Manifest:
    """One Kubernetes object read from a file."""

    path: Path
    body: dict

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def api_version(self) -> str:
        return str(self.body.get("apiVersion"))

    @property
    def name(self) -> str:
        return str((self.body.get("metadata") or {}).get("name"))

    @property
    def where(self) -> str:
        return f"{self.path}: {self.kind}/{self.name}"

    @property
    def spec(self) -> dict:
        spec = self.body.get("spec")
        return spec if isinstance(spec, dict) else {}

    def adapter_config_text(self) -> str | None:
        """The `config.yaml` of a prometheus-adapter rules ConfigMap (one with `rules`), else None."""
        text = (self.body.get("data") or {}).get("config.yaml") if self.kind == "ConfigMap" else None
        return text if isinstance(text, str) and re.search(r"^(external)?[rR]ules:", text, re.M) else None


@dataclass(frozen=True)
class ProjectFacts:
    """What the manifests must agree with, read from the repository."""

    version: str
    exposed_port: int
    entrypoint: tuple[str, ...]
    env_names: frozenset[str]
    metric_names: frozenset[str]
    ray_version: str | None
    serve_config: dict | None
    scaleout_config: type[BaseModel] | None

    @classmethod
    def load(cls, root: Path) -> ProjectFacts:
        """Facts of the repository at `root`."""
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        ray_pins = [
            m["version"] for dep in project["optional-dependencies"].get("ray", []) if (m := _RAY_PIN.match(dep))
        ]
        dockerfile = (root / "Dockerfile").read_text()
        expose = re.search(r"^EXPOSE\s+(\d+)", dockerfile, re.M)
        entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.M)
        if expose is None or entrypoint is None:
            raise ValueError("the Dockerfile has no EXPOSE or no exec-form ENTRYPOINT")
        serve_config_path = root / "deploy" / "ray" / "serve-config.yaml"
        return cls(
            version=project["version"],
            exposed_port=int(expose.group(1)),
            entrypoint=tuple(json.loads(entrypoint.group(1))),
            env_names=frozenset(f"FITSERVE_{name.upper()}" for name in Settings.model_fields) | EXTRA_ENV,
            metric_names=exposed_sample_names(),
            ray_version=ray_pins[0] if ray_pins else None,
            serve_config=yaml.safe_load(serve_config_path.read_text()) if serve_config_path.is_file() else None,
            scaleout_config=scaleout_config_model(),
        )


def scaleout_config_model() -> type[BaseModel] | None:
    """`ScaleoutConfig`, the `args` of fitserve's Serve application, where this checkout has it (no ray import)."""
    if importlib.util.find_spec("fitserve.server.scaleout") is None:
        return None
    return importlib.import_module("fitserve.server.scaleout.config").ScaleoutConfig


@dataclass(frozen=True)
class PodTemplate:
    """A pod template inside a manifest, with the role its fitserve containers play."""

    manifest: Manifest
    where: str
    labels: dict
    spec: dict
    serves_http: bool  # the image's entrypoint (`fitserve serve`) runs: probes, port and flags apply

    def containers(self) -> list[dict]:
        return [c for c in self.spec.get("containers") or [] if isinstance(c, dict)]


def pod_templates(manifest: Manifest) -> Iterator[PodTemplate]:
    """The pod templates of workloads and of a RayService's head and worker groups."""
    if manifest.kind in WORKLOAD_KINDS:
        templates = [(manifest.where, manifest.spec.get("template"), manifest.kind != "Job")]
    elif manifest.kind == "RayService":
        cluster = manifest.spec.get("rayClusterConfig") or {}
        templates = [(f"{manifest.where} head", (cluster.get("headGroupSpec") or {}).get("template"), False)]
        for group in cluster.get("workerGroupSpecs") or []:
            templates.append((f"{manifest.where} group {group.get('groupName')}", group.get("template"), False))
    else:
        return
    for where, template, serves_http in templates:
        if isinstance(template, dict):
            labels = (template.get("metadata") or {}).get("labels") or {}
            yield PodTemplate(manifest, where, labels, template.get("spec") or {}, serves_http)


def is_fitserve_image(image: str) -> bool:
    """`fitserve` or a variant such as `fitserve-ray`, from any registry."""
    match = _IMAGE.fullmatch(image)
    return bool(match and re.fullmatch(r"fitserve(-[a-z0-9]+)?", match.group("name")))


def parse_cli(argv: list[str]) -> argparse.Namespace | str:
    """`argv` (without the program name) parsed by the real `fitserve` parser, or the parser's error message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        lines = stderr.getvalue().strip().splitlines()
        return lines[-1] if lines else "rejected by the fitserve argument parser"


def number(value: object) -> float:
    """A count from a manifest as a float; 0 when absent or not a number (the schema check reports those)."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0.0


def gpu_limit(container: dict) -> float:
    """The container's nvidia.com/gpu limit (0 when absent or not a number)."""
    return number(((container.get("resources") or {}).get("limits") or {}).get(GPU_RESOURCE, 0))


def container_port_numbers(container: dict) -> dict[str | int, int]:
    """Port name and number -> number, for a container's declared ports."""
    numbers: dict[str | int, int] = {}
    for port in container.get("ports") or []:
        numbers[port.get("containerPort")] = port.get("containerPort")
        if port.get("name"):
            numbers[port["name"]] = port.get("containerPort")
    return numbers


def probe_problems(where: str, container: dict, facts: ProjectFacts) -> Iterator[Problem]:
    """Readiness on /ready, liveness and startup on /health, all on the port the image serves."""
    ports = container_port_numbers(container)
    if ports.get(facts.exposed_port) != facts.exposed_port:
        yield Problem(where, f"declares no containerPort {facts.exposed_port} (the Dockerfile's EXPOSE)")
    for probe_name, path in (
        ("readinessProbe", READY_PATH),
        ("livenessProbe", HEALTH_PATH),
        ("startupProbe", HEALTH_PATH),
    ):
        http_get = (container.get(probe_name) or {}).get("httpGet")
        if not isinstance(http_get, dict):
            yield Problem(where, f"{probe_name} must be an httpGet on {path}")
            continue
        if http_get.get("path") != path:
            yield Problem(where, f"{probe_name} must GET {path}, not {http_get.get('path')}")
        port = http_get.get("port", "")
        if ports.get(port) != facts.exposed_port:
            yield Problem(where, f"{probe_name} port {port!r} is not the served port {facts.exposed_port}")


def env_problems(where: str, container: dict, facts: ProjectFacts, needs_api_key: bool) -> Iterator[Problem]:
    """FITSERVE_* names exist; the API key comes from a Secret; FITSERVE_HOME is a mounted volume."""
    env = {item.get("name"): item for item in container.get("env") or [] if isinstance(item, dict)}
    for name in sorted(n for n in env if isinstance(n, str) and n.startswith("FITSERVE_")):
        if name not in facts.env_names:
            yield Problem(where, f"env {name} is no fitserve setting (server/settings.py: FITSERVE_<FIELD>)")
    api_key = env.get(API_KEY_ENV)
    if api_key is None and needs_api_key:
        yield Problem(where, f"env {API_KEY_ENV} is missing: the API must require a key")
    elif api_key is not None and not (api_key.get("valueFrom") or {}).get("secretKeyRef"):
        yield Problem(where, f"env {API_KEY_ENV} must come from a Secret (valueFrom.secretKeyRef), not a literal")
    # Every fitserve process reads the model cache: the server and Ray replicas load the model, the Ray ingress
    # (placed on any node, the head included) its tokenizer, the fetch Job fills it.
    home = (env.get("FITSERVE_HOME") or {}).get("value")
    mounts = {mount.get("mountPath") for mount in container.get("volumeMounts") or []}
    if home is None:
        yield Problem(where, "env FITSERVE_HOME must name the mounted model cache")
    elif home not in mounts:
        yield Problem(where, f"FITSERVE_HOME={home} is not a mounted volume (the model cache)")


def command_problems(where: str, container: dict, facts: ProjectFacts, serves_http: bool) -> Iterator[Problem]:
    """A `fitserve ...` command parses; the entrypoint's flags plus `args` parse and keep host and port."""
    command = [str(part) for part in container.get("command") or []]
    args = [str(part) for part in container.get("args") or []]
    if command:
        parsed = parse_cli(command[1:] + args) if command[0] == "fitserve" else None
        if isinstance(parsed, str):
            yield Problem(where, f"command {' '.join(command + args)!r}: {parsed}")
        return
    if not serves_http:
        return
    entry_args = list(facts.entrypoint[2:]) if facts.entrypoint[:2] == ("fitserve", "serve") else []
    flags = parse_cli(["serve", *entry_args, *args])
    if isinstance(flags, str):
        yield Problem(where, f"args {args} are not valid `fitserve serve` flags: {flags}")
        return
    if getattr(flags, "host", None) != "0.0.0.0" or getattr(flags, "port", None) != facts.exposed_port:
        yield Problem(where, f"args must keep --host 0.0.0.0 --port {facts.exposed_port} (the Dockerfile's entrypoint)")


def container_problems(template: PodTemplate, facts: ProjectFacts) -> Iterator[Problem]:
    """Every rule for the fitserve containers of one pod template."""
    for container in template.containers():
        image = str(container.get("image", ""))
        if not is_fitserve_image(image):
            continue
        where = f"{template.where} container {container.get('name')}"
        tag = _IMAGE.fullmatch(image).group("tag")  # type: ignore[union-attr]
        if tag != facts.version:
            yield Problem(where, f"image {image} must be tagged with the package version {facts.version}")
        yield from env_problems(where, container, facts, needs_api_key=template.manifest.kind != "Job")
        yield from command_problems(where, container, facts, template.serves_http)
        if template.serves_http and not container.get("command"):
            yield from probe_problems(where, container, facts)
            if gpu_limit(container) < 1:
                yield Problem(where, f"limits.{GPU_RESOURCE} must be at least 1 (the image is the CUDA build)")


def selects(selector: dict, labels: dict) -> bool:
    """A label selector's matchLabels (or a Service's plain selector) against pod labels."""
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(key) == value for key, value in wanted.items())


def reference_problems(manifests: list[Manifest]) -> Iterator[Problem]:
    """Services, PodMonitors, autoscalers and volumes point at things the manifests define."""
    templates = [t for m in manifests for t in pod_templates(m)]
    serving = [t for t in templates if t.serves_http]
    names = {(m.kind, m.name) for m in manifests}
    for manifest in manifests:
        spec = manifest.spec
        if manifest.kind in ("Service", "PodMonitor"):
            selector = spec.get("selector") or {}
            matched = [t for t in serving if selects(selector, t.labels)]
            if not matched:
                yield Problem(manifest.where, f"selector {selector} matches no fitserve pod template")
            ports = {
                name for t in matched for c in t.containers() for name in container_port_numbers(c) if name is not None
            }
            wanted = [p.get("targetPort", p.get("port")) for p in spec.get("ports") or []]
            wanted += [p.get("port") for p in spec.get("podMetricsEndpoints") or []]
            for port in wanted:
                if matched and port not in ports:
                    yield Problem(manifest.where, f"port {port!r} is not a port of the selected containers")
        target = spec.get("scaleTargetRef")
        if isinstance(target, dict) and (target.get("kind", "Deployment"), target.get("name")) not in names:
            yield Problem(manifest.where, f"scaleTargetRef {target.get('kind')}/{target.get('name')} is not defined")
        if manifest.kind == "ScrapeConfig":
            yield from scrape_target_problems(manifest, names)
    for template in templates:
        for volume in template.spec.get("volumes") or []:
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim is not None and ("PersistentVolumeClaim", claim) not in names:
                yield Problem(template.where, f"volume {volume.get('name')} claims {claim}, which is not defined")


def scrape_target_problems(manifest: Manifest, names: set[tuple[str, str]]) -> Iterator[Problem]:
    """A ScrapeConfig that reaches KubeRay's `<rayservice>-serve-svc` names a RayService defined here."""
    spec = manifest.spec
    addresses = [str(sd.get("url", "")) for sd in spec.get("httpSDConfigs") or []]
    addresses += [str(t) for static in spec.get("staticConfigs") or [] for t in static.get("targets") or []]
    for address in addresses:
        for service in re.findall(r"(?:^|/)([a-z0-9-]+)-serve-svc\b", address):
            if ("RayService", service) not in names:
                yield Problem(manifest.where, f"{address} is the Serve service of RayService {service}, not defined")


def metric_names(query: str) -> set[str]:
    """fitserve metric names a PromQL query selects (string literals and label values ignored)."""
    return set(_METRIC.findall(_PROMQL_STRING.sub('""', query)))


def adapter_published_metrics(rules: list[dict]) -> Iterator[tuple[str, str]]:
    """(series, published metric name) for each fitserve series an adapter rule discovers."""
    for rule in rules:
        naming = rule.get("name") or {}
        pattern = re.compile(naming.get("matches") or "^(.*)$")
        # The adapter's default for an empty `as`: the one capture group, else the whole match.
        replacement = naming.get("as") or ("$1" if pattern.groups == 1 else "$0")
        python_replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement)
        for series in metric_names(rule.get("seriesQuery", "")):
            yield series, pattern.sub(python_replacement, series)


def metric_problems(manifests: list[Manifest], facts: ProjectFacts) -> Iterator[Problem]:
    """Every fitserve metric a query names is exported; every HPA metric is published by an adapter rule."""
    published: set[str] = set()
    for manifest in manifests:
        config = manifest.adapter_config_text()
        if config is None:
            continue
        parsed = yaml.safe_load(config) or {}
        rules = [r for key in ("rules", "externalRules") for r in parsed.get(key) or [] if isinstance(r, dict)]
        for rule in rules:
            for query in (rule.get("seriesQuery", ""), rule.get("metricsQuery", "")):
                for name in sorted(metric_names(str(query)) - facts.metric_names):
                    yield Problem(manifest.where, f"adapter rule uses {name}, which fitserve does not export")
        published.update(name for _, name in adapter_published_metrics(rules))
    for manifest in manifests:
        if manifest.kind == "HorizontalPodAutoscaler":
            for metric in manifest.spec.get("metrics") or []:
                source = metric.get(str(metric.get("type", "")).lower()) or {}
                metric_name = (source.get("metric") or {}).get("name")
                if metric_name is not None and metric_name not in published:
                    yield Problem(
                        manifest.where, f"metric {metric_name} is published by no prometheus-adapter rule here"
                    )
        if manifest.kind == "ScaledObject":
            for trigger in manifest.spec.get("triggers") or []:
                if trigger.get("type") != "prometheus":
                    continue
                query = str((trigger.get("metadata") or {}).get("query", ""))
                names = metric_names(query)
                if not names:
                    yield Problem(manifest.where, f"trigger {trigger.get('name')} queries no fitserve metric")
                for name in sorted(names - facts.metric_names):
                    yield Problem(manifest.where, f"trigger {trigger.get('name')} uses {name}, not exported")


def settings_problems(where: str, settings: object) -> Iterator[Problem]:
    """A Serve application's `args.settings`: fitserve `Settings` fields with valid values."""
    if not isinstance(settings, dict):
        yield Problem(where, "args.settings must be a mapping of fitserve settings")
        return
    unknown = sorted(set(settings) - set(Settings.model_fields))
    if unknown:  # Settings ignores unknown keys, so they would pass silently
        yield Problem(where, f"args.settings has no fitserve setting {unknown} (server/settings.py)")
        return
    try:
        Settings(**settings)
    except ValidationError as error:
        first = error.errors()[0]
        yield Problem(where, f"args.settings.{'.'.join(map(str, first['loc']))}: {first['msg']}")


def worker_gpus(cluster: dict) -> tuple[float, float]:
    """(most GPUs of one worker pod, GPUs of all worker groups at their maxReplicas)."""
    per_pod, total = 0.0, 0.0
    for group in cluster.get("workerGroupSpecs") or []:
        containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or []
        gpus = sum(gpu_limit(c) for c in containers if isinstance(c, dict))
        per_pod = max(per_pod, gpus)
        total += gpus * number(group.get("maxReplicas", group.get("replicas")))
    return per_pod, total


def application_problems(where: str, application: dict, cluster: dict, facts: ProjectFacts) -> Iterator[Problem]:
    """One Serve application: fitserve's, as in deploy/ray/serve-config.yaml, with replicas the workers can hold."""
    name = application.get("name")
    where = f"{where} application {name}"
    if not str(application.get("import_path", "")).startswith("fitserve."):
        yield Problem(where, "does not import a fitserve module")
    reference = {a.get("name"): a for a in (facts.serve_config or {}).get("applications") or []}
    if facts.serve_config is not None and name not in reference:
        yield Problem(where, "is not an application of deploy/ray/serve-config.yaml")
    for key in ("import_path", "route_prefix"):
        if name in reference and application.get(key) != reference[name].get(key):
            yield Problem(where, f"{key} differs from deploy/ray/serve-config.yaml ({reference[name].get(key)})")
    args = application.get("args") or {}
    yield from settings_problems(where, args.get("settings", {}))
    if facts.scaleout_config is not None:
        try:
            facts.scaleout_config.model_validate(args)
        except ValidationError as error:
            first = error.errors()[0]
            yield Problem(where, f"args.{'.'.join(map(str, first['loc']))}: {first['msg']} (ScaleoutConfig)")
    per_pod, total = worker_gpus(cluster)
    num_gpus = args.get("num_gpus", 0)
    if not isinstance(num_gpus, int | float) or not 0 < num_gpus <= per_pod:
        yield Problem(where, f"args.num_gpus {num_gpus} must be above 0 and at most a worker's {per_pod:g} GPUs")
        return
    replicas = (args.get("autoscaling") or {}).get("max_replicas", args.get("num_replicas", 1))
    if isinstance(replicas, int) and replicas * num_gpus > total:
        yield Problem(where, f"{replicas} replicas of {num_gpus:g} GPU exceed the workers' {total:g} GPUs")


def rayservice_problems(manifest: Manifest, facts: ProjectFacts) -> Iterator[Problem]:
    """serveConfigV2 runs fitserve's Serve application on the GPU workers; the Ray version is the pinned one."""
    try:
        serve_config = yaml.safe_load(str(manifest.spec.get("serveConfigV2", "")))
    except yaml.YAMLError as error:
        yield Problem(manifest.where, f"serveConfigV2 is not YAML: {error}")
        return
    applications = serve_config.get("applications") if isinstance(serve_config, dict) else None
    cluster = manifest.spec.get("rayClusterConfig") or {}
    if not applications:
        yield Problem(manifest.where, "serveConfigV2 has no applications")
    for application in applications or []:
        yield from application_problems(manifest.where, application, cluster, facts)
    if facts.ray_version is not None and cluster.get("rayVersion") != facts.ray_version:
        yield Problem(
            manifest.where, f"rayVersion {cluster.get('rayVersion')} is not the pinned ray {facts.ray_version}"
        )
    if worker_gpus(cluster)[0] < 1:
        yield Problem(manifest.where, f"no worker group has limits.{GPU_RESOURCE} (replicas would run on CPU)")


def project_problems(manifests: list[Manifest], facts: ProjectFacts) -> Iterator[Problem]:
    """Every project rule over a set of manifests."""
    for manifest in manifests:
        if not manifest.name or manifest.name == "None":
            yield Problem(manifest.where, "metadata.name is missing")
        for template in pod_templates(manifest):
            yield from container_problems(template, facts)
        if manifest.kind == "RayService":
            yield from rayservice_problems(manifest, facts)
    yield from reference_problems(manifests)
    yield from metric_problems(manifests, facts)
