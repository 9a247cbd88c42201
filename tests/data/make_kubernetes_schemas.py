"""How tests/data/kubernetes_schemas.json was made (run by hand; the tests only read its output).

    python tests/data/make_kubernetes_schemas.py KUBERNETES_VALIDATE_WHEEL PYTORCHJOB_CRD_YAML

- Kubernetes v1.33 (strict: unknown fields refused): the JSON schemas bundled in the PyPI wheel
  kubernetes-validate 1.37.0 (kubernetes-json-schema/v1.33.0-local-strict), for Job, Service and
  PersistentVolumeClaim, with only the definitions they reach.
- PyTorchJob: the openAPIV3Schema of kubeflow/training-operator v1.9.0,
  manifests/base/crds/kubeflow.org_pytorchjobs.yaml. Its pod template schema (the core PodTemplateSpec,
  repeated inline) is replaced by a reference to the Kubernetes definition above, and every object with listed
  properties refuses others, as `kubectl apply` (strict field validation) does.
Descriptions are removed (most of the size). The output is one Draft 2020-12 document whose "$defs" hold the
definitions and the kinds ("kind:Job", "kind:Service", "kind:PersistentVolumeClaim", "kind:PyTorchJob").
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import yaml

VERSION_DIR = "kubernetes_validate/kubernetes-json-schema/v1.33.0-local-strict/"
KINDS = {"kind:Job": "job-batch-v1.json", "kind:Service": "service-v1.json",
         "kind:PersistentVolumeClaim": "persistentvolumeclaim-v1.json"}
POD_TEMPLATE = "io.k8s.api.core.v1.PodTemplateSpec"


def stripped(node, refs: set[str]):
    """`node` without descriptions, its references made local ("#/$defs/NAME"), the names it refers to added."""
    if isinstance(node, list):
        return [stripped(item, refs) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("description", "$id", "$schema"):  # "$id" would make "#/$defs/..." point into the kind itself
            continue
        if key == "$ref":
            name = value.rsplit("/", 1)[1]
            refs.add(name)
            value = f"#/$defs/{name}"
        out[key] = stripped(value, refs)
    return out


def strict_crd(node):
    """A CRD schema made strict: an object with properties and no preserve-unknown-fields refuses others."""
    if isinstance(node, list):
        return [strict_crd(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_crd(value) for key, value in node.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def main(wheel: str, crd_yaml: str, out: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        everything = json.loads(z.read(VERSION_DIR + "_definitions.json"))["$defs"]
        refs: set[str] = {POD_TEMPLATE}
        defs = {kind: stripped(json.loads(z.read(VERSION_DIR + name)), refs) for kind, name in KINDS.items()}
    crd = yaml.safe_load(Path(crd_yaml).read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    replica = schema["properties"]["spec"]["properties"]["pytorchReplicaSpecs"]["additionalProperties"]
    replica["properties"]["template"] = {"$ref": f"#/$defs/{POD_TEMPLATE}"}
    pytorchjob = strict_crd(stripped(schema, refs))
    pytorchjob["properties"]["apiVersion"]["enum"] = ["kubeflow.org/v1"]
    pytorchjob["properties"]["kind"]["enum"] = ["PyTorchJob"]
    defs["kind:PyTorchJob"] = pytorchjob
    pending = set(refs)
    while pending:  # the definitions reached from the kinds, transitively
        name = pending.pop()
        found: set[str] = set()
        defs[name] = stripped(everything[name], found)
        pending |= found - defs.keys()
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                "$comment": "Made by tests/data/make_kubernetes_schemas.py: see its docstring for the sources.",
                "$defs": dict(sorted(defs.items()))}
    Path(out).write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], str(Path(__file__).with_name("kubernetes_schemas.json")))
