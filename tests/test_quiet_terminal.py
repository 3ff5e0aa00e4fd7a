"""Without --verbose, what Ray tells the driver stays off the terminal and goes to a log file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from orchestrator import ray_runtime
    ray_runtime.prefer_loopback()
    ray_runtime.set_verbose(sys.argv[1] == "verbose")
    ray_runtime.init_ray(None, num_cpus=1)
    import ray
    from ray._private import worker
    from ray._private.utils import push_error_to_driver
    logging.getLogger("ray.tune").warning("TUNE-NOTICE")
    # What the raylet does when it warns about worker processes: a message pushed to the driver,
    # printed by Ray's listener thread.
    driver = worker.global_worker
    push_error_to_driver(driver, "mode_cl_test", "PUSHED-NOTICE", job_id=driver.current_job_id)
    log = Path(ray_runtime.logs_dir()) / ray_runtime.DRIVER_LOG
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (log.is_file() and "PUSHED-NOTICE" in log.read_text()):
        time.sleep(0.2)
    time.sleep(0.5)  # verbose: the listener prints to the terminal instead; give it the same time
    print("LOG:" + str(log), flush=True)
    ray.shutdown()
    """
)


def _drive(mode: str) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, mode],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, done.stdout.split("LOG:")[-1].strip()


def _env() -> dict[str, str]:
    """A local Ray (no address) with token auth by default, which Ray announces at start."""
    from trainables.environment import snapshot

    return {k: v for k, v in snapshot().items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


def test_rays_notices_go_to_the_driver_log_not_the_terminal():
    terminal, log_path = _drive("quiet")
    for notice in ("TUNE-NOTICE", "PUSHED-NOTICE", "Token authentication"):
        assert notice not in terminal, terminal[-3000:]
    logged = Path(log_path).read_text()
    assert "TUNE-NOTICE" in logged and "PUSHED-NOTICE" in logged and "Token authentication" in logged, logged


def test_verbose_prints_them_on_the_terminal():
    terminal, _ = _drive("verbose")
    for notice in ("TUNE-NOTICE", "PUSHED-NOTICE", "Token authentication"):  # so the quiet test means something
        assert notice in terminal, terminal[-3000:]
