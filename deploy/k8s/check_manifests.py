"""Static check of fitserve's Kubernetes manifests, offline: schemas first, then fitserve's own rules.

    python deploy/k8s/check_manifests.py               # every manifest under deploy/k8s
    python deploy/k8s/check_manifests.py FILE_OR_DIR   # only these (e.g. your edited copies)

Core kinds are validated strictly (unknown fields are errors) against the Kubernetes JSON schemas shipped in the
`kubernetes-validate` package, for every version in KUBERNETES_VERSIONS. Custom resources (RayService,
ScaledObject, PodMonitor, ScrapeConfig) are validated against the CRD schemas committed in deploy/k8s/schemas/,
made strict the way `kubectl apply` is. A kind with no schema is an error, not a warning. Then `manifest_rules`
checks what no schema knows: probes on /ready and /health, image, port and flags that agree with the Dockerfile
and the CLI, metric names that fitserve exports, references between the manifests. Exit status 1 when anything
is wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from manifest_rules import Manifest, Problem, ProjectFacts, project_problems

K8S_DIR = Path(__file__).resolve().parent
ROOT = K8S_DIR.parents[1]
SCHEMA_DIR = K8S_DIR / "schemas"
# The oldest Kubernetes minor the manifests claim to support and the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
# (apiVersion, kind) -> committed schema (deploy/k8s/schemas/SOURCES.md says where each comes from).
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice-ray.io-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"): "scrapeconfig-monitoring.coreos.com-v1alpha1.json",
}
ADAPTER_CONFIG_SCHEMA = "prometheus-adapter-config.json"
# libyaml's loader when PyYAML was built with it (ten times faster), else the pure-Python one; both are safe.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def manifest_files(paths: Iterable[Path]) -> list[Path]:
    """YAML files named by `paths`, directories searched recursively (the schemas folder is skipped)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*.y*ml")) if SCHEMA_DIR not in p.parents)
        else:
            files.append(path)
    return files


def load_manifests(files: Iterable[Path]) -> tuple[list[Manifest], list[Problem]]:
    """Every non-empty YAML document of the files, and a problem for each file that does not parse."""
    manifests, problems = [], []
    for path in files:
        try:
            documents = [doc for doc in yaml.load_all(path.read_text(), Loader=SAFE_LOADER) if doc is not None]
        except (OSError, yaml.YAMLError) as error:
            problems.append(Problem(str(path), f"cannot be read as YAML: {error}"))
            continue
        for document in documents:
            if isinstance(document, dict) and {"apiVersion", "kind"} <= set(document):
                manifests.append(Manifest(path, document))
            else:
                problems.append(Problem(str(path), "a document is not a Kubernetes object (apiVersion, kind)"))
    return manifests, problems


def strict(schema: object) -> object:
    """A CRD schema as `kubectl apply` enforces it: declared properties only, unless unknown fields are kept."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    closed = "properties" in schema and "additionalProperties" not in schema
    if closed and not schema.get("x-kubernetes-preserve-unknown-fields"):
        tightened["additionalProperties"] = False
    return tightened


@cache
def committed_schema(name: str, make_strict: bool) -> jsonschema.Draft202012Validator:
    """A validator for a schema file of deploy/k8s/schemas, built once."""
    schema = json.loads((SCHEMA_DIR / name).read_text())
    return jsonschema.Draft202012Validator(strict(schema) if make_strict else schema)


def json_schema_errors(document: object, validator: jsonschema.Draft202012Validator) -> list[str]:
    """Every violation of a JSON schema as `field: message`, in field order."""
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(str(part) for part in e.absolute_path) or '(document)'}: {e.message}" for e in errors]


@cache
def crd_schema_errors(schema_name: str, body_json: str) -> tuple[str, ...]:
    """A custom resource's violations of its committed CRD schema (cached on the object's JSON text)."""
    return tuple(json_schema_errors(json.loads(body_json), committed_schema(schema_name, make_strict=True)))


@cache
def kubernetes_schema_error(body_json: str, version: str) -> str | None:
    """Why Kubernetes `version` rejects an object (strict: unknown fields are errors), or None when it accepts it.

    Cached on the object's JSON text: the tests check the same unchanged manifests many times.
    """
    body = json.loads(body_json)
    try:
        kubernetes_validate.validate(body, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        field = ".".join(str(part) for part in error.path) or "(document)"
        return f"{field}: {error.message} (Kubernetes {error.version})"
    except kubernetes_validate.SchemaNotFoundError:
        return f"no schema for {body['apiVersion']} {body['kind']} (Kubernetes {version}, deploy/k8s/schemas)"
    return None


def schema_problems(manifest: Manifest) -> Iterator[Problem]:
    """The manifest against its schema: a committed CRD schema, else Kubernetes' own for each pinned version."""
    crd = CRD_SCHEMAS.get((manifest.api_version, manifest.kind))
    if crd is not None:
        body_json = json.dumps(manifest.body, sort_keys=True, default=str)
        yield from (Problem(manifest.where, error) for error in crd_schema_errors(crd, body_json))
        # A CRD schema leaves `metadata` open; Kubernetes' ObjectMeta, checked here through a ConfigMap, does not.
        holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": manifest.body.get("metadata")}
        error = kubernetes_schema_error(json.dumps(holder, sort_keys=True, default=str), KUBERNETES_VERSIONS[-1])
        if error is not None:
            yield Problem(manifest.where, error)
        return
    body_json = json.dumps(manifest.body, sort_keys=True, default=str)
    for version in KUBERNETES_VERSIONS:
        error = kubernetes_schema_error(body_json, version)
        if error is not None:
            yield Problem(manifest.where, error)
            return


def adapter_config_problems(manifest: Manifest) -> Iterator[Problem]:
    """A prometheus-adapter rules ConfigMap: its config.yaml against the adapter's config schema."""
    text = manifest.adapter_config_text()
    if text is None:
        return
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        yield Problem(manifest.where, f"data.config.yaml is not YAML: {error}")
        return
    adapter_schema = committed_schema(ADAPTER_CONFIG_SCHEMA, make_strict=False)
    for violation in json_schema_errors(config, adapter_schema):
        yield Problem(f"{manifest.where} data.config.yaml", violation)


def check(files: Iterable[Path], facts: ProjectFacts) -> tuple[list[Manifest], list[Problem]]:
    """All manifests of the files and every problem found in them (schemas, then project rules)."""
    manifests, problems = load_manifests(files)
    for manifest in manifests:
        problems.extend(schema_problems(manifest))
        problems.extend(adapter_config_problems(manifest))
    try:
        problems.extend(project_problems(manifests, facts))
    except (AttributeError, TypeError, KeyError, ValueError) as error:
        if not problems:  # well-formed manifests: a failing rule is a bug of the check, not of the input
            raise
        problems.append(Problem("(project rules)", f"not run: fix the schema errors above first ({error!r})"))
    return manifests, problems


def main(argv: list[str] | None = None) -> int:
    """Check the manifests; print each problem; 0 when there is none, 1 otherwise."""
    parser = argparse.ArgumentParser(description="Validate fitserve's Kubernetes manifests offline.")
    parser.add_argument("paths", nargs="*", type=Path, default=[K8S_DIR], help="files or folders (default: deploy/k8s)")
    args = parser.parse_args(argv)
    files = manifest_files(args.paths)
    if not files:
        print("no manifest files found", file=sys.stderr)
        return 1
    manifests, problems = check(files, ProjectFacts.load(ROOT))
    for problem in problems:
        print(f"ERROR {problem}")
    kinds = sorted({m.kind for m in manifests})
    versions = ", ".join(v.rsplit(".", 1)[0] for v in KUBERNETES_VERSIONS)
    verdict = f"{len(problems)} problem(s)" if problems else "ok"
    print(f"{verdict}: {len(manifests)} resources in {len(files)} files ({', '.join(kinds)}); Kubernetes {versions}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
