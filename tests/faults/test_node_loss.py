"""Loss of a whole Ray node: a two-node cluster on this machine (``ray.cluster_utils.Cluster``); the
trial's Train worker runs on the worker node (the head has no CPUs for it), which is removed after
the first task checkpoint and replaced by a fresh node, as a preempted spot instance would be. Ray
Train restarts the worker group there from the newest checkpoint; the results equal an
uninterrupted run's and no placement group is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.test_ray_train import MICRO, comparable
from trainables.config import load_run_config
from trainables.engine import run_sequence

MODE_CL = str(Path(sys.executable).with_name("mode-cl"))


def test_losing_the_workers_node_mid_sequence_resumes_on_a_new_node(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, check=False)
    work_dir, storage, out = tmp_path / "work", tmp_path / "storage", tmp_path / "out"
    expected = run_sequence(load_run_config(None, MICRO), work_dir, None, log=lambda _: None)
    loopback = {"node_ip_address": "127.0.0.1"}  # its nodes listen and are reached on loopback only
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"TRAIN_DRIVER": 1}, **loopback}
    )
    try:
        doomed = cluster.add_node(num_cpus=1, **loopback)
        cluster.wait_for_nodes()
        command = [MODE_CL, "run", "--work-dir", str(work_dir), "--name", "nodeloss", "--storage", str(storage)]
        command += ["--out", str(out), "--address", cluster.address]
        command += [arg for item in [*MICRO, "resources.cpus_per_worker=1"] for arg in ("--set", item)]
        log = (tmp_path / "run.log").open("w")
        # ray.cluster_utils starts its nodes without token auth (`ray start` turns it on): say so,
        # or mode-cl would present the local token as Ray's own `auto` does (see init_ray).
        env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        first_task = storage / "nodeloss" / "ckpt_t01_s000000" / "manifest.json"
        deadline = time.monotonic() + 300
        while not first_task.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first_task.exists(), (tmp_path / "run.log").read_text()[-3000:]
        cluster.remove_node(doomed, allow_graceful=False)  # the node dies with the worker on it
        cluster.add_node(num_cpus=1, **loopback)  # its replacement joins
        assert process.wait(timeout=600) == 0, (tmp_path / "run.log").read_text()[-4000:]
        assert "resuming from checkpoint ckpt_t01_s000000" in (tmp_path / "run.log").read_text()  # on the new node
        results = json.loads((out / "results.json").read_text())
        assert comparable(results) == comparable(expected)
        starts = [e["task"] for e in results["task_log"] if e["event"] == "start"]
        assert starts[0] == 0 and sorted(set(starts)) == [0, 1, 2] and starts.count(0) == 1  # task 1 not redone
        ray.init(address=cluster.address)
        from ray.util import placement_group_table

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
            if not live:
                break
            time.sleep(1)
        assert live == []  # nothing leaked by the dead worker group
    finally:
        ray.shutdown()
        cluster.shutdown()
