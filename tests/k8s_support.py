"""Offline checks of Kubernetes manifests: render them with kustomize, validate them as the API server would.

KubeRay kinds are checked against the served v1 `openAPIV3Schema` of the CRDs in ../shared/kuberay-crds, made
strict the way the API server is (an unknown field is an error). Core kinds (ConfigMap, Secret, ...) are checked
against kubernetes-validate's bundled schemas in strict mode. Nothing here needs a cluster or the network.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from conftest import SHARED  # noqa: E402 - ../shared beside the repository, not part of it

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = SHARED / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
# The oldest Kubernetes release the manifests promise to work on (docs/deploy.md says the same).
KUBERNETES_VERSION = "1.30"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes: libyaml reads them ~10x faster


def tool(name: str) -> str | None:
    """A command-line tool from this environment (the dev extra installs kubectl and hadolint), else from PATH."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


@functools.cache
def kustomize_build(folder: Path) -> tuple[dict, ...]:
    """The objects `kubectl apply -k folder` would send, rendered by the real kustomize."""
    out = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kustomize {folder} failed:\n{out.stderr}")
    return tuple(doc for doc in yaml.load_all(out.stdout, Loader=LOADER) if doc)


def strict_schema(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema, with the API server's strictness.

    Objects that declare `properties` reject other fields unless `x-kubernetes-preserve-unknown-fields` says
    otherwise; `nullable: true` admits null; `x-kubernetes-int-or-string` admits both; the other `x-kubernetes-*`
    extensions (list types, CEL validations) are dropped, so CEL rules are not checked here.
    """
    out = {k: v for k, v in schema.items() if k != "nullable" and not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {name: strict_schema(sub) for name, sub in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if schema.get("x-kubernetes-embedded-resource"):  # an embedded object always has these three
            for name in ("apiVersion", "kind", "metadata"):
                out["properties"].setdefault(name, {})
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict_schema(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict_schema(sub) for sub in schema[key]]
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=LOADER)
    served = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served")]
    assert served, f"the {kind} CRD serves no v1"
    return jsonschema.Draft7Validator(strict_schema(served[0]["schema"]["openAPIV3Schema"]))


def validation_errors(doc: dict) -> list[str]:
    """What the API server would refuse in this object, one line per problem (empty: it is valid)."""
    if doc.get("apiVersion", "").startswith("ray.io/"):
        if doc["apiVersion"] != "ray.io/v1":
            return [f"apiVersion {doc['apiVersion']}: use ray.io/v1"]
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in crd_validator(doc["kind"]).iter_errors(doc)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def cpu_cores(quantity) -> float:
    """A Kubernetes CPU quantity ("44", "500m", 2) in cores."""
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def pod_specs(cluster_spec: dict) -> dict[str, dict]:
    """The pod spec of the head and of each worker group of a RayCluster spec, by group name."""
    pods = {"head": cluster_spec["headGroupSpec"]["template"]["spec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        pods[group["groupName"]] = group["template"]["spec"]
    return pods
