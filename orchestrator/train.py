"""Run one task sequence on Ray Train (``mode-cl run``'s default path).

The driver prepares data and the base model once (both cached in the work dir), then starts a
``TorchTrainer`` whose workers run :func:`trainables.worker.train_fn_per_worker`. The run's
identity is ``(storage, name)``: launching the same name and storage again after an
interruption makes Ray Train hand the workers the newest checkpoint, so the sequence continues
where it stopped. ``results.json`` is rebuilt from the final checkpoint, exactly as the in-process
path builds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainables.base_model import pretrain_base
from trainables.checkpoint import latest_good, list_checkpoints
from trainables.config import RunConfig
from trainables.engine import Log, prepare_data, results_from_progress, write_results


def default_run_name(config: RunConfig) -> str:
    return f"{config.method.name}-{config.config_hash()}"


# Sweep trial drivers reserve a sliver of this custom resource instead of CPU: a fractional CPU per
# driver leaves e.g. 0.98 of the second core free, so a second 1-CPU Train worker never fits.
# cluster.yaml gives the head node TRAIN_DRIVER, which also keeps drivers off preemptible workers.
DRIVER_RESOURCE = "TRAIN_DRIVER"


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join ``address`` or start a local Ray with the dashboard bound to 127.0.0.1 (the dashboard
    process is what frees the placement groups of stopped trials)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address:
        _token_auth_for_explicit_address(address)
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            resources={DRIVER_RESOURCE: 1.0},
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )


def _token_auth_for_explicit_address(address: str) -> None:
    """Ray sends its auth token only when it finds the cluster itself (``auto``); given an explicit
    ``HOST:PORT`` it connects without one unless RAY_AUTH_MODE=token, and a token-protected cluster
    (Ray's default) then answers "Authentication token is missing" for 20 s. With a token available
    (``~/.ray/auth_token``, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) we present it, as ``auto`` would."""
    if address == "auto" or "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray caches its config at import: refresh it, as Ray's own `auto` path does
            from ray._private.authentication.authentication_token_setup import _enable_token_auth
        except ImportError:
            return
        _enable_token_auth()


def run_with_ray(
    config: RunConfig,
    work_dir: Path,
    out_dir: Path,
    name: str,
    storage: str,
    address: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainables.worker import train_fn_per_worker

    work_dir = Path(work_dir).resolve()
    if config.coin is None:  # the digits benchmark: data and base model built once, here
        pretrain_base(config.base, config.data, prepare_data(config, work_dir), work_dir)
    local_run_dir = Path(storage) / name if "://" not in storage else None
    if local_run_dir is not None and list_checkpoints(local_run_dir):
        log(f"run {name!r} already has checkpoints in {local_run_dir}: resuming it instead of starting over")
    init_ray(address)
    resources = config.resources
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "work_dir": str(work_dir),
            "run_dir": str(local_run_dir.resolve()) if local_run_dir is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep or None),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            # Workers may run in a Ray started before this call; pass our own settings explicitly.
            worker_runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("MODE_CL_")}},
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        final = latest_good([Path(directory)])
    if final is None:
        raise RuntimeError(f"the final checkpoint of run {name!r} does not verify; rerun the same command to resume")
    results = results_from_progress(config, final.progress)
    write_results(results, Path(out_dir))
    return results
