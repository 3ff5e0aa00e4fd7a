"""The Kubernetes manifests in k8s/, checked offline (no cluster, no network).

- Core objects (PersistentVolumeClaim, Deployment, Service) and every pod template inside the Ray
  custom resources: the Kubernetes OpenAPI schemas shipped by the ``kubernetes-validate`` package,
  strict variant (unknown fields fail, as ``kubectl apply``'s server-side field validation does).
- RayCluster / RayJob (ray.io/v1): no package ships the KubeRay CRDs, so ``KUBERAY_V1_SCHEMA`` below
  is a JSON Schema of their spec, written from KubeRay's Go API types
  (ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go, KubeRay 1.3/1.4; the CRDs in
  ray-operator/config/crd/bases/ are generated from them): every field of the structs we touch,
  with its JSON name, type and enum, and no others (a misspelt field fails). Embedded Kubernetes
  types (pod templates) are checked by the Kubernetes schemas above.
- Our own rules: the tools the manifests invoke parse their arguments (``mlflow server`` with the
  installed MLflow's CLI, ``ray start`` with Ray's, entrypoints with mode-cl's argparse), the MLflow
  host allow-list admits the names it is reached by (MLflow's own matcher), ClusterIP only, no
  plaintext credentials, GPU workers, TRAIN_DRIVER on the head, the Ray version of the pin.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# The oldest Kubernetes these manifests are meant for and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.29", kubernetes_validate.latest_version()]
SHARED_MOUNT = "/mnt/shared"
IMAGE_SOURCE_DIR = "/home/ray/mode-cl"  # WORKDIR of k8s/Dockerfile: the checkout inside the image


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _docs(kind: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in MANIFESTS for d in _load(p) if kind is None or d["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for _, d in _docs(kind) if d["metadata"]["name"] == name]
    return doc


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"{f}:RayCluster", d["spec"]) for f, d in _docs("RayCluster")]
    return specs + [(f"{f}:RayJob", d["spec"]["rayClusterSpec"]) for f, d in _docs("RayJob")]


def _ray_groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def _pod_templates() -> list[tuple[str, dict[str, Any]]]:
    templates = [(f"{f}:{d['metadata']['name']}", d["spec"]["template"]) for f, d in _docs("Deployment")]
    for where, spec in _ray_cluster_specs():
        templates += [(f"{where}:{group}", g["template"]) for group, g in _ray_groups(spec)]
    return templates


def _ray_containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(group, g["template"]["spec"]["containers"][0]) for group, g in _ray_groups(spec)]


# ---------------------------------------------------------------------------------------------
# KubeRay ray.io/v1 schema (see the module docstring for its source). Go int32 -> integer in the
# int32 range; map[string]string -> object of strings; corev1 types -> "object" here, their content
# is validated against the Kubernetes schemas (pod templates) or not used by these manifests.
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_K8S_OBJECT = {"type": "object"}
_MANAGED_BY = {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}

KUBERAY_V1_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {
        "RayClusterSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["headGroupSpec"],
            "properties": {
                "suspend": {"type": "boolean"},
                "managedBy": _MANAGED_BY,
                "autoscalerOptions": {"$ref": "#/$defs/AutoscalerOptions"},
                "headServiceAnnotations": _STRING_MAP,
                "enableInTreeAutoscaling": {"type": "boolean"},
                "gcsFaultToleranceOptions": _K8S_OBJECT,
                "headGroupSpec": {"$ref": "#/$defs/HeadGroupSpec"},
                "rayVersion": {"type": "string"},
                "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/WorkerGroupSpec"}},
            },
        },
        "HeadGroupSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["template"],
            "properties": {
                "template": _K8S_OBJECT,  # corev1.PodTemplateSpec
                "headService": _K8S_OBJECT,  # corev1.Service
                "enableIngress": {"type": "boolean"},
                "rayStartParams": _STRING_MAP,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"]},
            },
        },
        "WorkerGroupSpec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groupName", "template"],
            "properties": {
                "suspend": {"type": "boolean"},
                "groupName": {"type": "string", "minLength": 1},
                "replicas": _INT32,
                "minReplicas": _INT32,
                "maxReplicas": _INT32,
                "idleTimeoutSeconds": _INT32,
                "rayStartParams": _STRING_MAP,
                "template": _K8S_OBJECT,  # corev1.PodTemplateSpec
                "scaleStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
                },
                "numOfHosts": _INT32,
            },
        },
        "AutoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "resources": _K8S_OBJECT,  # corev1.ResourceRequirements
                "image": {"type": "string"},
                "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
                "securityContext": _K8S_OBJECT,
                "idleTimeoutSeconds": _INT32,
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "env": {"type": "array", "items": _K8S_OBJECT},
                "envFrom": {"type": "array", "items": _K8S_OBJECT},
                "volumeMounts": {"type": "array", "items": _K8S_OBJECT},
            },
        },
        "RayJobSpec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {**_INT32, "minimum": 1},
                "backoffLimit": _INT32,
                "rayClusterSpec": {"$ref": "#/$defs/RayClusterSpec"},
                "submitterPodTemplate": _K8S_OBJECT,
                "metadata": _STRING_MAP,
                "clusterSelector": _STRING_MAP,
                "submitterConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"backoffLimit": _INT32},
                },
                "managedBy": _MANAGED_BY,
                "deletionPolicy": {"enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]},
                "entrypoint": {"type": "string"},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": _INT32,
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
        "Metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        **{
            kind: {
                "type": "object",
                "additionalProperties": False,
                "required": ["apiVersion", "kind", "metadata", "spec"],
                "properties": {
                    "apiVersion": {"const": "ray.io/v1"},
                    "kind": {"const": kind},
                    "metadata": {"$ref": "#/$defs/Metadata"},
                    "spec": {"$ref": f"#/$defs/{kind}Spec"},
                },
            }
            for kind in ("RayCluster", "RayJob")
        },
    },
}


def test_the_manifests_exist_and_parse():
    kinds = sorted(d["kind"] for _, d in _docs())
    expected = ["Deployment", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob"]
    assert kinds == [*expected, "Service"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_and_pod_templates_match_the_kubernetes_schemas(version):
    core = [(f, d) for f, d in _docs() if d["apiVersion"] != "ray.io/v1"]
    for name, template in _pod_templates():  # as a core PodTemplate: its template is a PodTemplateSpec
        core.append(
            (name, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
        )
    for where, doc in core:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{where} {doc['kind']}: {path}: {error.message} (Kubernetes {version})")


def test_ray_custom_resources_match_the_kuberay_schema():
    ray_docs = [(f, d) for f, d in _docs() if d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for _, d in ray_docs} == {"RayCluster", "RayJob"}
    for where, doc in ray_docs:
        schema = {**KUBERAY_V1_SCHEMA, "$ref": f"#/$defs/{doc['kind']}"}
        jsonschema.Draft202012Validator.check_schema(schema)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
        assert not errors, f"{where}: " + "; ".join(
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )


def test_nothing_is_exposed_outside_the_cluster():
    services = _docs("Service")
    assert services, "the MLflow Service"
    for where, service in services:
        assert service["spec"].get("type") == "ClusterIP", f"{where}: {service['metadata']['name']} must be ClusterIP"
    assert not _docs("Ingress")
    for where, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType") == "ClusterIP", f"{where}: the head Service must be ClusterIP"
        assert not head.get("enableIngress"), where
    for where, template in _pod_templates():
        for container in template["spec"]["containers"]:
            assert all("hostPort" not in port for port in container.get("ports", [])), where
        assert not template["spec"].get("hostNetwork"), where


def _mlflow_container() -> dict[str, Any]:
    [container] = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, on importing MLflow's CLI
def test_mlflow_server_arguments_parse_and_use_the_volume():
    from mlflow.cli import server

    deployment = _one("Deployment", "mlflow")
    container = _mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    params = server.make_context("server", list(container["args"])).params  # the installed MLflow's CLI
    [mount] = container["volumeMounts"]
    backend = urlparse(params["backend_store_uri"])
    assert backend.scheme == "sqlite" and backend.path.startswith(f"/{mount['mountPath']}/"), backend
    assert params["artifacts_destination"].startswith(f"{mount['mountPath']}/")
    assert params["serve_artifacts"], "artifacts are proxied: Ray pods need no storage credentials"
    assert params["host"] == "0.0.0.0" and int(params["workers"]) == 1
    [port] = container["ports"]
    assert port["containerPort"] == params["port"] == 5000
    # one SQLite writer on a ReadWriteOnce volume
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # the Service reaches this container
    [(_, service)] = _docs("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])


def _tracking_uris() -> list[tuple[str, str]]:
    uris = []
    for where, spec in _ray_cluster_specs():
        for group, container in _ray_containers(spec):
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            uris.append((f"{where}:{group}", env.get("MLFLOW_TRACKING_URI")))
    for where, job in _docs("RayJob"):
        uris.append((f"{where} entrypoint", _parse_entrypoint(job["spec"]["entrypoint"]).tracking_uri))
    return uris


def test_mlflow_accepts_the_hosts_it_is_reached_by():
    from mlflow.server.security_utils import HEALTH_ENDPOINTS, is_allowed_host_header

    container = _mlflow_container()
    args = container["args"]
    allowed_arg = args[args.index("--allowed-hosts") + 1]
    # Kubernetes expands $(VAR) in args only from the container's env
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert set(re.findall(r"\$\((\w+)\)", allowed_arg)) <= set(env)
    allowed = allowed_arg.replace("$(POD_NAMESPACE)", "team-a").split(",")

    [(_, service)] = _docs("Service")
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    in_cluster = [f"{name}:{port}", f"{name}.team-a:{port}", f"{name}.team-a.svc:{port}"]
    port_forward = [f"localhost:{port}", f"127.0.0.1:{port}", "localhost:8080"]  # kubectl port-forward
    for host in [*in_cluster, f"{name}.team-a.svc.cluster.local:{port}", *port_forward]:
        assert is_allowed_host_header(allowed, host), f"Host {host} would be rejected"
    for host in ["attacker.example:5000", f"{name}.team-b.svc:{port}", "10.0.0.7:5000", f"{name}:80"]:
        assert not is_allowed_host_header(allowed, host), f"Host {host} should be rejected"
    # what the Ray pods and the entrypoints use is the Service, and allowed
    for where, uri in _tracking_uris():
        assert uri, f"{where}: no MLflow tracking URI"
        parsed = urlparse(uri)
        assert (parsed.scheme, parsed.hostname, parsed.port) == ("http", name, port), f"{where}: {uri}"
        assert is_allowed_host_header(allowed, parsed.netloc), f"{where}: {uri}"
    # kubelet probes send the pod IP as Host: only the endpoints exempt from the check work
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in HEALTH_ENDPOINTS, probe


_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL|API_KEY|PRIVATE_KEY", re.IGNORECASE)
_USERINFO_PASSWORD = re.compile(r"://[^/\s:@]+:(?!\$\()[^/\s@]+@")  # scheme://user:password@ ($(VAR) is fine)


def _walk(value: Any, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    yield path, value


def test_no_plaintext_credentials():
    for path in [*MANIFESTS, K8S / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path.name}: an AWS access key id"
        assert "PRIVATE KEY-----" not in text, f"{path.name}: a private key"
    for where, doc in _docs():
        assert doc["kind"] != "Secret", f"{where}: create Secrets with kubectl, reference them by name"
        for path, value in _walk(doc):
            in_env = re.search(r"\.env\[\d+\]$", path)
            if in_env and isinstance(value, dict) and "value" in value:
                assert not _SECRET_NAME.search(value["name"]), f"{where}{path}: use valueFrom.secretKeyRef"
            if isinstance(value, str):
                assert not _USERINFO_PASSWORD.search(value), f"{where}{path}: a password in a URI"


def _parse_entrypoint(entrypoint: str):
    from orchestrator.cli import build_parser

    argv = shlex.split(entrypoint)
    assert not {"&&", "||", ";", "|"} & set(argv), f"one mode-cl command per entrypoint: {entrypoint}"
    assert argv[0] == "mode-cl", entrypoint
    return build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on anything it rejects
