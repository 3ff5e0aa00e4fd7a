"""``mode-cl run``: one task sequence, in this process (``--no-ray``) or on Ray Train.

:func:`run` refuses to resume a run written with another config, then runs it. On Ray, the
driver prepares data and the base model once (both cached in the work dir), then starts the
Ray Train trainer that :func:`ray_trainer` builds (for sweep trials too), whose workers run
:func:`trainables.worker.train_fn_per_worker`. The run's identity is ``(storage, name)``:
launching the same name and storage again after an interruption makes Ray Train hand the workers
the newest checkpoint, so the sequence continues where it stopped. ``results.json`` is rebuilt
from the final checkpoint, exactly as the in-process path builds it.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.ray_runtime import init_ray
from trainables.benchmarks import prepare
from trainables.checkpoint import latest_good, list_checkpoints
from trainables.config import RunConfig, config_diff
from trainables.environment import snapshot
from trainables.errors import UserError

if TYPE_CHECKING:
    from trainables.worker import LoopConfig
from trainables.results import results_from_progress, write_predictions, write_results
from trainables.run_context import Log


def default_run_name(config: RunConfig) -> str:
    return f"{config.method.name}-{config.config_hash()}"


def run(
    config: RunConfig,
    work_dir: Path,
    *,
    name: str | None = None,
    out: Path | None = None,
    storage: str | None = None,
    address: str | None = None,
    in_process: bool = False,
    log: Log = print,
) -> tuple[dict[str, Any], Path]:
    """``mode-cl run``: the sequence in this process or on Ray Train; (results, results directory).

    A run resumes when its checkpoints exist (``--out`` in process, ``storage/name`` on Ray), and
    is refused before anything starts if they were written with a different config."""
    work_dir = Path(work_dir).resolve()
    name = name or default_run_name(config)
    out = Path(out) if out else work_dir / "runs" / name
    storage = storage or str(work_dir / "ray_results")
    if in_process:
        from trainables.engine import run_sequence

        refuse_changed_config(out / "checkpoints", config, name)
        return run_sequence(config, work_dir, out, log=log), out
    refuse_changed_config(Path(storage) / name if "://" not in storage else None, config, name)
    return run_with_ray(config, work_dir, out, name, storage, address, log=log), out


def refuse_changed_config(checkpoints: Path | None, config: RunConfig, name: str) -> None:
    """Resuming a run whose stored config differs would mix two experiments: refuse, with the diff
    (the newest readable checkpoint decides)."""
    for directory in reversed(list_checkpoints(checkpoints) if checkpoints else []):
        try:
            stored = json.loads((directory / "state.json").read_text())
        except (OSError, ValueError):
            continue
        if stored.get("config_hash") != config.config_hash():
            raise UserError(
                f"run {name!r} already exists with a different config "
                f"({config_diff(stored['config'], config.to_dict())}); "
                "rerun it unchanged to resume, or pick another --name/--out"
            )
        return


def ray_trainer(
    config: RunConfig, loop: LoopConfig, name: str, storage: str, callbacks: list[Any] | None = None
) -> Any:
    """The Ray Train trainer of one run (``mode-cl run``, or one sweep trial with Tune's callback):
    workers and resources from ``config.resources``, identity ``(storage, name)``.

    Several workers get a ``TorchTrainer``, whose backend joins them in a ``torch.distributed``
    process group. One worker gets a plain ``DataParallelTrainer`` (the class ``TorchTrainer``
    extends) with Ray Train's no-op backend: a single worker needs no process group, and so no
    c10d TCPStore, which torch 2.13 binds to every interface (it has no setting for the address);
    and nothing the Train controller unpickles names ``ray.train.torch``, so the controller does
    not import torch, about 1.4 s off every trial's start and every resume. The engine sees
    world size 1 either way, and picks its device itself (the one visible GPU); see RELIABILITY.md."""
    import ray.train

    from trainables.worker import train_fn_per_worker

    resources = config.resources
    if resources.num_workers > 1:
        from ray.train.torch import TorchTrainer as Trainer
    else:  # the default backend: every hook a no-op
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer as Trainer
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return Trainer(
        train_fn_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers, use_gpu=resources.use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep or None),
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            # Workers may run in a Ray started before this call; pass our own settings explicitly.
            worker_runtime_env={"env_vars": {k: v for k, v in snapshot().items() if k.startswith("MODE_CL_")}},
        ),
    )


def fit_or_interrupt(trainer: Any) -> Any:
    """``trainer.fit()``, where a stop is a KeyboardInterrupt: Ray Train's own SIGINT handler
    (installed by ``fit`` in the main thread, and left installed) aborts the run and ends it with
    ``sys.exit``; the CLI then says the command was stopped, and by which signal. The SIGINT
    handler from before ``fit`` is put back."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        if main:
            signal.signal(signal.SIGINT, before if before is not None else signal.SIG_DFL)


def run_with_ray(
    config: RunConfig,
    work_dir: Path,
    out_dir: Path,
    name: str,
    storage: str,
    address: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    from trainables.worker import LoopConfig

    work_dir = Path(work_dir).resolve()
    prepare(config, work_dir)  # e.g. the digits data and base model, built once here for every worker
    local_run_dir = Path(storage) / name if "://" not in storage else None
    if local_run_dir is not None and list_checkpoints(local_run_dir):
        log(f"run {name!r} already has checkpoints in {local_run_dir}: resuming it instead of starting over")
    init_ray(address)
    run_dir = str(local_run_dir.resolve()) if local_run_dir is not None else None
    trainer = ray_trainer(config, LoopConfig(config.to_dict(), str(work_dir), run_dir), name, storage)
    result = fit_or_interrupt(trainer)
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        final = latest_good([Path(directory)])
    if final is None:
        raise RuntimeError(f"the final checkpoint of run {name!r} does not verify; rerun the same command to resume")
    results = results_from_progress(config, final.progress)
    write_results(results, Path(out_dir))
    write_predictions(final.progress, Path(out_dir))
    return results
