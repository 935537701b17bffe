"""Extract the validation schema of one version of a CustomResourceDefinition into deploy/k8s/schemas/.

The manifest check (`deploy/k8s/check_manifests.py`) validates custom resources offline against these files.
To update one, download the CRD YAML from the project's release and run, for example:

    python deploy/k8s/vendor_crd_schema.py ray.io_rayservices.yaml v1 deploy/k8s/schemas/rayservice-ray.io-v1.json

The `openAPIV3Schema` of the named version is written as JSON with every `description` removed (they are
most of the file's size and play no part in validation); everything else is kept as the project wrote it.
Record the source, tag and licence in deploy/k8s/schemas/SOURCES.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def without_descriptions(node: object) -> object:
    """A copy of a schema tree with every `description` keyword dropped."""
    if isinstance(node, dict):
        return {key: without_descriptions(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [without_descriptions(item) for item in node]
    return node


def crd_version_schema(crd: dict, version: str) -> dict:
    """The openAPIV3Schema of `version` in a CRD document; KeyError when the CRD has no such version."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def main(argv: list[str] | None = None) -> int:
    """Write the description-free schema of one CRD version as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd", type=Path, help="the CustomResourceDefinition YAML")
    parser.add_argument("version", help="the CRD version to extract, e.g. v1")
    parser.add_argument("output", type=Path, help="where to write the JSON schema")
    args = parser.parse_args(argv)
    crd = yaml.safe_load(args.crd.read_text())
    schema = without_descriptions(crd_version_schema(crd, args.version))
    args.output.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    print(f"{args.output}: {crd['spec']['group']}/{args.version} {crd['spec']['names']['kind']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
