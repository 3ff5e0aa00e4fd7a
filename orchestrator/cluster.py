"""Sweeps on a Ray cluster brought up with ``ray up``: the sweep driver runs on the head node.

``mode-cl sweep SPACE --cluster CLUSTER.yaml`` uploads the space (and its run config) to the head
with ``ray rsync-up`` and runs ``mode-cl sweep`` there through ``ray exec``, joined to the running
cluster (``--address auto``) and logging to the head's MLflow server (started by the cluster's
``head_start_ray_commands``). ``resume`` does the same with ``mode-cl resume``; ``ui`` forwards the
MLflow UI over SSH; ``cluster-down`` stops the head's services, then ``ray down``.

Where things live on the head is read from the cluster YAML's ``metadata.mode_cl`` block
(``project_dir``, ``work_dir``, ``storage``, ``mlflow_store``, ``mlflow_port``).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainables.errors import UserError

RAY = str(Path(sys.executable).with_name("ray"))
REQUIRED = ("project_dir", "work_dir", "storage", "mlflow_store", "mlflow_port")
PLACEHOLDER = "YOUR-"


class ClusterError(UserError):
    """A cluster file or cluster command problem, reported in one line."""


@dataclass(frozen=True)
class Cluster:
    config_path: Path
    name: str
    project_dir: str
    work_dir: str
    storage: str
    mlflow_store: str
    mlflow_port: int

    @property
    def mode_cl(self) -> str:
        """The head's mode-cl executable (the project's virtualenv, as installed by setup_commands)."""
        return f"{self.project_dir}/.venv/bin/mode-cl"

    @property
    def ray(self) -> str:
        return f"{self.project_dir}/.venv/bin/ray"

    @property
    def tracking_uri(self) -> str:
        """Shell expression, evaluated on the head: the URI its tracking server wrote at start."""
        return f'"$(cat {self.mlflow_store}/tracking_uri)"'


def load_cluster(path: str | Path) -> Cluster:
    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"{path}: cluster file not found (e.g. --cluster cluster.local.yaml)")
    text = path.read_text()
    for number, line in enumerate(text.splitlines(), start=1):
        if PLACEHOLDER in line and not line.lstrip().startswith("#"):
            word = next(w for w in line.replace(":", " ").replace(".", " ").split() if PLACEHOLDER in w)
            raise ClusterError(f"{path}:{number}: replace the placeholder {word} with your own value")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ClusterError(f"{path}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict) or not data.get("cluster_name"):
        raise ClusterError(f"{path}: cluster_name: missing; this must be a `ray up` cluster file")
    settings = (data.get("metadata") or {}).get("mode_cl")
    if not isinstance(settings, dict):
        raise ClusterError(f"{path}: metadata.mode_cl: missing; see cluster.local.yaml for the block mode-cl needs")
    for key in REQUIRED:
        if key not in settings:
            raise ClusterError(f"{path}: metadata.mode_cl.{key}: missing (needs {', '.join(REQUIRED)})")
    return Cluster(
        path, str(data["cluster_name"]), *(str(settings[k]) for k in REQUIRED[:-1]), int(settings["mlflow_port"])
    )


def _run(command: list[str]) -> int:
    return subprocess.call(command)


def exec_on_head(cluster: Cluster, command: str, port_forward: int | None = None) -> int:
    """``ray exec`` a shell command on the head, streaming its output; returns its exit code."""
    extra = ["--port-forward", str(port_forward)] if port_forward else []
    return _run([RAY, "exec", str(cluster.config_path), command, *extra])


def upload_space(cluster: Cluster, space_path: Path, sweep_name: str) -> str:
    """Copy the space and its run config to ``<project_dir>/mode-cl-spaces/<sweep>/`` on the head."""
    data = yaml.safe_load(space_path.read_text()) or {}
    run_config = data.get("run_config")
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / sweep_name
        staging.mkdir()
        if run_config:
            source = (space_path.parent / run_config).resolve()
            (staging / source.name).write_text(source.read_text())
            data["run_config"] = source.name
        (staging / space_path.name).write_text(yaml.safe_dump(data, sort_keys=False))
        remote = f"{cluster.project_dir}/mode-cl-spaces/"
        code = exec_on_head(cluster, f"mkdir -p {remote}")
        if code == 0:
            code = _run([RAY, "rsync-up", str(cluster.config_path), str(staging), remote])
        if code != 0:
            raise ClusterError(f"could not upload {space_path} to the head of {cluster.name} (exit {code})")
    return f"{remote}{sweep_name}/{space_path.name}"


def _paths(cluster: Cluster) -> str:
    return f"--work-dir {cluster.work_dir} --storage {cluster.storage}"


def _common(cluster: Cluster) -> str:
    return f"--address auto --tracking-uri {cluster.tracking_uri} {_paths(cluster)}"


def sweep_on_cluster(cluster: Cluster, space_path: Path, sweep_name: str) -> int:
    remote_space = upload_space(cluster, space_path, sweep_name)
    command = f"{cluster.mode_cl} sweep {remote_space} --name {shlex.quote(sweep_name)} {_common(cluster)}"
    return exec_on_head(cluster, f"cd {cluster.project_dir} && {command}")


def resume_on_cluster(cluster: Cluster, sweep_name: str) -> int:
    command = f"{cluster.mode_cl} resume {shlex.quote(sweep_name)} {_common(cluster)}"
    return exec_on_head(cluster, f"cd {cluster.project_dir} && {command}")


BEGIN, END = "----- mode-cl output begins -----", "----- mode-cl output ends -----"


def report_on_cluster(cluster: Cluster, sweep_name: str, output_format: str) -> int:
    """The head's ``mode-cl report``, printed without ``ray exec``'s own messages (so that
    ``--format json`` output can be piped)."""
    command = f"{cluster.mode_cl} report {shlex.quote(sweep_name)} --format {output_format} {_paths(cluster)}"
    wrapped = f"cd {cluster.project_dir} && echo '{BEGIN}' && {command}; code=$?; echo '{END}'; exit $code"
    result = subprocess.run(
        [RAY, "exec", str(cluster.config_path), wrapped], capture_output=True, text=True, check=False
    )
    lines = result.stdout.splitlines()
    if BEGIN in lines and END in lines:
        print("\n".join(lines[lines.index(BEGIN) + 1 : lines.index(END)]))
    else:
        sys.stderr.write(result.stdout[-3000:])
    sys.stderr.write(result.stderr if result.returncode else "")
    return result.returncode


def ui_on_cluster(cluster: Cluster, local_port: int) -> int:
    """Forward ``127.0.0.1:local_port`` to the head's MLflow server until interrupted.

    An SSH tunnel (Ray's own, from the cluster file's auth) reaches a relay on the head's loopback
    (port ``mlflow_port + 100``), which connects to the server's own address — the head's private IP
    on clouds, so that workers can reach it; nothing is opened beyond SSH."""
    from ray.autoscaler.sdk import run_on_cluster

    relay_port = cluster.mlflow_port + 100
    print(f"MLflow UI of cluster {cluster.name}: http://127.0.0.1:{local_port}  (Ctrl-C to stop)", flush=True)
    relay = f"{cluster.mode_cl} tracking-server relay --store {cluster.mlflow_store} --port {relay_port}"
    try:
        run_on_cluster(str(cluster.config_path), cmd=relay, port_forward=(local_port, relay_port))
    except KeyboardInterrupt:
        pass
    except Exception as error:  # Ray raises ClickException/RuntimeError subclasses for SSH failures
        print(f"error: the tunnel to {cluster.name} failed ({error})", file=sys.stderr)
        return 1
    return 0


def down(cluster: Cluster) -> int:
    """Stop the head's tracking server and Ray, then ``ray down``: the local provider's ``ray down``
    alone leaves the head's Ray processes running."""
    stop = (
        # relays left by `ui --cluster` (the store unquoted: the head's shell expands a leading ~)
        f'pkill -f "tracking-server rela[y] --store "{cluster.mlflow_store}; '  # [y]: not this shell
        f"{cluster.mode_cl} tracking-server stop --store {cluster.mlflow_store}; "
        f"{cluster.ray} stop --force; rm -f ~/ray_bootstrap_config.yaml ~/ray_bootstrap_key.pem"
    )
    exec_on_head(cluster, stop)  # best effort: a head that is already gone has nothing to stop
    return _run([RAY, "down", "-y", str(cluster.config_path)])
