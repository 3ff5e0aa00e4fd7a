"""The Ray side of the Kubernetes manifests in k8s/: ``ray start`` parameters, GPU autoscaling, the
Ray version and image, RayJob entrypoints and the shared work-dir volume (see test_k8s_manifests.py)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.test_k8s_manifests import (
    IMAGE_SOURCE_DIR,
    K8S,
    ROOT,
    SHARED_MOUNT,
    _docs,
    _one,
    _parse_entrypoint,
    _pod_templates,
    _ray_cluster_specs,
    _ray_groups,
)


def _ray_start_args(params: dict[str, str], head: bool) -> list[str]:
    """The `ray start` arguments KubeRay builds from rayStartParams (convertParamMap in
    ray-operator/controllers/ray/common/pod.go: "true" is a bare flag, "false" is dropped, except for
    options taking true/false as a value), split as the bash in the Ray container splits them."""
    flags = ["--head"] if head else []
    for key, value in sorted(params.items()):
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard"):
            flags += [f"--{key}"] if value.lower() == "true" else []
        else:
            flags.append(f"--{key}={value}")
    return shlex.split(" ".join(flags))


# importing Ray's CLI imports Ray Serve's pydantic models, which warn about pydantic 2 deprecations
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_start_params_parse_and_the_head_advertises_train_driver():
    from ray.scripts.scripts import start

    from orchestrator.ray_runtime import DRIVER_RESOURCE

    for where, spec in _ray_cluster_specs():
        for group, g in _ray_groups(spec):
            params = start.make_context("start", _ray_start_args(g.get("rayStartParams", {}), group == "head")).params
            resources = json.loads(params["resources"] or "{}")
            if group == "head":
                # sweeps refuse to start without it (orchestrator/sweep.py), drivers reserve a sliver each
                assert resources.get(DRIVER_RESOURCE, 0) >= 1, f"{where}: the head must advertise {DRIVER_RESOURCE}"
                # RayJob submission (submitter pod) and the operator reach the dashboard through the head Service
                assert params["dashboard_host"] == "0.0.0.0", where
            else:
                assert DRIVER_RESOURCE not in resources, f"{where}:{group}: drivers belong on the head"


def test_gpu_worker_group_autoscales():
    for where, spec in _ray_cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, where
        gpu_groups = []
        for group, g in _ray_groups(spec)[1:]:
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{where}:{group}"
            [container] = g["template"]["spec"]["containers"]
            resources = container["resources"]
            gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            if gpus:
                gpu_groups.append(group)
                # extended resources: Kubernetes requires requests == limits where both are given
                assert int(resources.get("requests", {}).get("nvidia.com/gpu", gpus)) == gpus, f"{where}:{group}"
                assert g["minReplicas"] == 0 and g["maxReplicas"] >= 1, f"{where}:{group}: scale from zero"
        assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"
        head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{where}: the head is a CPU node"


def test_ray_version_and_image_match_the_pin():
    import trainables

    pyproject = (ROOT / "pyproject.toml").read_text()  # (no tomllib on Python 3.10)
    [ray_pin] = [Requirement(r) for r in re.findall(r'^\s*"(ray\b[^"]*)"', pyproject, re.MULTILINE)]
    [requires_python] = re.findall(r'^requires-python\s*=\s*"([^"]+)"', pyproject, re.MULTILINE)
    dockerfile = (K8S / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, f"k8s/Dockerfile: FROM {base}: expected rayproject/ray:<version>-py<XY>-gpu"
    assert ray_pin.specifier.contains(match[1]), f"the image's Ray {match[1]} is not {ray_pin}"
    assert SpecifierSet(requires_python).contains(f"{match[2]}.{match[3]}")
    image = f"mode-cl:{trainables.__version__}"
    for where, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == match[1], f"{where}: rayVersion {spec['rayVersion']} != the image's {match[1]}"
    for where, template in _pod_templates():
        for container in template["spec"]["containers"]:
            assert container["image"] == image, f"{where}: {container['image']} (built by k8s/Dockerfile: {image})"


def test_rayjobs_run_mode_cl_on_the_shared_volume():
    from orchestrator.space import load_space

    jobs = {d["metadata"]["name"]: d["spec"] for _, d in _docs("RayJob")}
    commands = {name: _parse_entrypoint(spec["entrypoint"]) for name, spec in jobs.items()}
    [sweep] = [a for a in commands.values() if a.command == "sweep"]
    [resume] = [a for a in commands.values() if a.command == "resume"]
    for args in (sweep, resume):
        assert args.address == "auto" and not args.no_tracking
        assert args.storage.startswith(f"{SHARED_MOUNT}/")  # the same storage, so resume finds the sweep
    assert resume.storage == sweep.storage
    assert str(sweep.work_dir).startswith(f"{SHARED_MOUNT}/")
    # the space file is in the image (k8s/Dockerfile copies search_spaces/) and valid
    assert sweep.space.startswith(f"{IMAGE_SOURCE_DIR}/"), sweep.space
    assert re.search(rf"^WORKDIR {IMAGE_SOURCE_DIR}$", (K8S / "Dockerfile").read_text(), re.MULTILINE)
    space = load_space(ROOT / Path(sweep.space).relative_to(IMAGE_SOURCE_DIR), cpus_available=8)
    assert resume.sweep == (sweep.name or space.name), "the resume job continues the sweep job's sweep"
    for spec in jobs.values():
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec.get("backoffLimit", 0) == 0, "a retried `mode-cl sweep` refuses the existing sweep"


def test_rayjobs_create_the_raycluster_spec():
    [(_, cluster)] = _docs("RayCluster")
    for where, job in _docs("RayJob"):
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{where}: rayClusterSpec differs from raycluster.yaml"
        assert "clusterSelector" not in job["spec"], where


def test_ray_pods_share_the_work_dir_volume():
    for where, spec in _ray_cluster_specs():
        for group, g in _ray_groups(spec):
            pod = g["template"]["spec"]
            [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == SHARED_MOUNT]
            [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"], f"{where}:{group}: every node mounts it"
    # MODE_CL_* variables go to Train workers and MLFLOW_PORT is read by `mlflow server`: no service links
    for where, template in _pod_templates():
        assert template["spec"].get("enableServiceLinks") is False, where
