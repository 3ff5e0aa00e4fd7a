"""Both cluster files pass Ray's own config preparation and validation, plus our rules: MLflow on
the head, sweep state on storage every node shares, services on loopback/private addresses, no secrets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cluster import ClusterError, load_cluster

ROOT = Path(__file__).resolve().parents[1]
MODE_CL = str(Path(sys.executable).with_name("mode-cl"))
SECRET = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key|password\s*[:=]|secret\s*[:=]|token\s*[:=])", re.I)


def _prepared(name: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / name).read_text()))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_cluster_files_pass_ray_validation_and_our_rules(name):
    config = _prepared(name)
    text = (ROOT / name).read_text()
    assert config["head_node_type"] in config["available_node_types"]
    head_commands = " ".join(config["head_start_ray_commands"])
    assert "tracking-server start" in head_commands  # MLflow runs on the head
    assert "--dashboard-host=127.0.0.1" in head_commands
    # Ray's v2 autoscaler may terminate its own head while `ray stop` restarts it (see the yaml)
    head_start = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(head_start) == 1 and head_start[0].startswith("RAY_enable_autoscaler_v2=0 ")
    assert not SECRET.search(text)
    settings = yaml.safe_load(text)["metadata"]["mode_cl"]
    for command in (*config["head_start_ray_commands"], *config["setup_commands"]):
        if "tracking-server start" in command:
            assert re.search(r"--host (127\.0\.0\.1|auto)\b", command)  # loopback or the private IP
            assert settings["mlflow_store"] in command
    head = config["available_node_types"][config["head_node_type"]]
    if name == "cluster.yaml":
        assert head["resources"].get("TRAIN_DRIVER", 0) > 0  # drivers stay on the on-demand head
        assert all(  # GPU workers are the preemptible ones
            t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
            for n, t in config["available_node_types"].items()
            if n != config["head_node_type"]
        )
        # several nodes: work dir and sweep storage on the shared filesystem mounted by setup_commands
        assert settings["work_dir"].startswith("/mnt/shared/") and settings["storage"].startswith("/mnt/shared/")
        assert any("/mnt/shared" in c and "mount" in c for c in config["setup_commands"])
    else:
        assert '"TRAIN_DRIVER": 1' in head_commands
        assert config["provider"]["head_ip"] == "127.0.0.1"


def test_cloud_cluster_file_is_refused_until_its_placeholder_is_replaced(tmp_path):
    with pytest.raises(ClusterError, match=r"cluster.yaml:\d+: replace the placeholder YOUR-EFS-ID"):
        load_cluster(ROOT / "cluster.yaml")
    filled = tmp_path / "cluster.yaml"
    filled.write_text((ROOT / "cluster.yaml").read_text().replace("YOUR-EFS-ID", "fs-0123456789abcdef0"))
    cluster = load_cluster(filled)
    assert cluster.project_dir == "/home/ubuntu/mode-cl" and cluster.mlflow_port == 5000
    assert load_cluster(ROOT / "cluster.local.yaml").work_dir == "~/mode-cl-work"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("provider: {type: local}\n", "cluster_name: missing"),
        ("cluster_name: x\nprovider: {type: local}\n", "metadata.mode_cl: missing"),
        ("cluster_name: x\nmetadata: {mode_cl: {project_dir: /p}}\n", "metadata.mode_cl.work_dir: missing"),
        ("cluster_name: [x\n", "not valid YAML"),
    ],
)
def test_bad_cluster_files_fail_in_one_line_with_exit_2_before_anything_runs(tmp_path, content, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    for command in (["sweep", str(ROOT / "search_spaces" / "digits_sweep.yaml")], ["resume", "x"], ["ui"]):
        result = subprocess.run(
            [MODE_CL, *command, "--cluster", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written


def test_sweeps_refuse_object_store_storage_in_one_line(tmp_path):
    result = subprocess.run(
        [MODE_CL, "sweep", str(ROOT / "search_spaces" / "digits_sweep.yaml"), "--storage", "s3://b/x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "sweeps need a filesystem path" in result.stderr
    assert list(tmp_path.iterdir()) == []
