"""MLflow tracking of one trial, from the rank-0 worker: one child run per trial, reopened on resume.

The run is found again by its ``trial_id`` tag, so a restored trial keeps logging into the run it
started (Ray's own MLflow callback opens a second one). Metric steps already present in MLflow are
never logged again, so a resume that replays steps after its last checkpoint duplicates nothing.
Metric keys come from :func:`metric_key`; step = tasks learned so far (0 = base model), and
``train/loss`` uses the global optimizer step.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trainables import __version__
from trainables.environment import snapshot


def metric_key(*parts: str) -> str:
    """The one place metric names are built: ``acc/parity``, ``gen/acc``, ``train/loss``."""
    return "/".join(parts)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = ",".join(str(v) for v in value)
        else:
            flat[name] = str(value)
    return flat


class TrialTracker:
    """Logs one trial's progress to MLflow. All calls are no-ops on ranks other than 0."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str | None,
        trial_id: str,
        trial_name: str,
        config: dict[str, Any],
        checkpoints: str = "all",
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.experiment_id, self.trial_id, self.checkpoints = experiment_id, trial_id, checkpoints
        existing = self.client.search_runs([experiment_id], filter_string=f"tags.trial_id = '{trial_id}'")
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"trial_id": trial_id, "mode_cl_version": __version__, "task_order": ",".join(config["tasks"])}
            tags["method"] = config["method"]["name"]
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id, run_name=trial_name, tags=tags)
            self.run_id = run.info.run_id
            params = flatten(config)
            params["task_order"] = " > ".join(config["tasks"])
            for start in range(0, len(params), 100):
                chunk = dict(list(params.items())[start : start + 100])
                self.client.log_batch(self.run_id, params=[_param(k, v) for k, v in chunk.items()])
        self._logged: dict[str, int] = {}  # metric → highest step already in MLflow

    def _last_step(self, key: str) -> int:
        if key not in self._logged:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged[key] = max((m.step for m in history), default=-1)
        return self._logged[key]

    def log_metrics(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        batch = []
        for key, value in values.items():
            # None: undefined (e.g. FWT before a second task); NaN: not evaluated at this stage
            # (eval.tasks / eval.generation schedules) — neither is a measurement.
            if value is None or math.isnan(value) or step <= self._last_step(key):
                continue
            batch.append(Metric(key, float(value), 0, step))
            self._logged[key] = step
        for start in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 500])

    def log_progress(self, tasks: list[str], progress, metrics: dict[str, Any], checkpoint_dir: Path) -> None:
        """Called at every checkpoint: losses since the last log, and at task ends the stage metrics."""
        from mlflow.entities import Metric

        step, losses = 0, []
        for task_losses in progress.losses:
            for value in task_losses:
                losses.append((step, value))
                step += 1
        last = self._last_step(metric_key("train", "loss"))
        fresh = [Metric(metric_key("train", "loss"), v, 0, s) for s, v in losses if s > last]
        for start in range(0, len(fresh), 500):
            self.client.log_batch(self.run_id, metrics=fresh[start : start + 500])
        if fresh:
            self._logged[metric_key("train", "loss")] = fresh[-1].step
        if progress.step != 0:
            return  # mid-task checkpoint: no new evaluation
        done = progress.next_task
        stage = {metric_key("acc", task): value for task, value in zip(tasks, progress.acc_matrix[done], strict=True)}
        generation = progress.generation[done]
        if "open_accuracy" in generation:  # answers also scored over the whole vocabulary
            open_row = zip(tasks, generation["open_accuracy"], strict=False)
            stage |= {metric_key("open_acc", task): value for task, value in open_row}
            stage["open_avg_acc"] = metrics.get("open_avg_acc")
        stage |= {metric_key("gen", "acc"): generation["accuracy"], metric_key("gen", "fd"): generation["frechet"]}
        stage[metric_key("gen", "nll")] = generation["nll"]
        for name in ("text_align", "image_align"):  # CoIN with sampled text-to-image scoring
            if name in generation:
                stage[metric_key("gen", name)] = generation[name]
        stage["avg_acc"] = metrics.get("avg_acc")
        stage["fwt"] = metrics.get("fwt")  # undefined before the second task: not logged
        stage["retention"] = metrics.get("retention")
        # Nothing can have been forgotten before a second task (or, for generation, at the base
        # stage): 0 by definition, so these curves start at step 0 like the others.
        for key in ("forgetting", "bwt", "inter_modal_forgetting", "open_forgetting"):
            if key == "open_forgetting" and "open_accuracy" not in generation:
                continue
            stage[key] = metrics.get(key) if metrics.get(key) is not None else 0.0
        self.log_metrics(stage, step=done)
        self._log_predictions(done, generation)
        if done > 0 and (self.checkpoints == "all" or (self.checkpoints == "final" and done == len(tasks))):
            self.client.log_artifacts(self.run_id, str(checkpoint_dir), f"checkpoints/task_{done:02d}")

    def _log_predictions(self, stage: int, scores: dict[str, Any]) -> None:
        """The stage's per-sample predictions as ``predictions/stage_<k>.parquet``."""
        import pyarrow.parquet as pq

        from trainables.results import predictions_table

        table = predictions_table([scores], first_stage=stage)
        if table is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"stage_{stage:02d}.parquet"
            pq.write_table(table, path)
            self.client.log_artifact(self.run_id, str(path), "predictions")

    def finish(self, results: dict[str, Any], ray_checkpoint: str | None) -> None:
        """Final artifacts: accuracy matrix (CSV, Parquet, heatmap), forgetting curves, results."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tasks = results["tasks"]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            stages = ["base", *(f"after_{t}" for t in tasks)]
            table = pa.table(
                {"stage": stages, **{t: [row[i] for row in results["acc_matrix"]] for i, t in enumerate(tasks)}}
            )
            pq.write_table(table, out / "acc_matrix.parquet")
            buffer = io.StringIO()
            buffer.write(",".join(["stage", *tasks]) + "\n")
            for stage, row in zip(stages, results["acc_matrix"], strict=True):
                buffer.write(",".join([stage, *(f"{v:.6f}" for v in row)]) + "\n")
            (out / "acc_matrix.csv").write_text(buffer.getvalue())
            (out / "results.json").write_text(redact(json.dumps(results, indent=2)))
            plot_accuracy_matrix(results, out / "acc_matrix.png")
            plot_forgetting_curves(results, out / "forgetting_curves.png")
            self.client.log_artifacts(self.run_id, tmp)
        # Where this attempt's wall time went (a resumed trial reports its last attempt only).
        profile = results.get("profile", {})
        values = {f"time_s/{k}": v for k, v in profile.get("seconds", {}).items()}
        values |= {"peak_rss_mb": profile.get("peak_rss_mb"), "peak_gpu_mb": profile.get("peak_gpu_mb")}
        self.log_metrics(values, step=len(tasks))
        if ray_checkpoint:
            self.client.set_tag(self.run_id, "ray_checkpoint", ray_checkpoint)
        self.client.set_terminated(self.run_id, "FINISHED")


SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
REDACTED = "***redacted***"


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with the value of every secret-looking environment variable (name matching KEY,
    TOKEN, SECRET, PASSWORD, CREDENTIAL, AUTH; value of 8+ characters) replaced: a secret passed
    through a config value or a path must not reach MLflow params or logs."""
    # os.environ is shared with other threads (MLflow's telemetry sets and removes variables in a
    # Train worker): it is read once, atomically (trainables.environment), never iterated.
    # A mapping given by the caller: names listed first, a name gone by the time it is read skipped.
    values = snapshot() if environ is None else {name: environ.get(name) for name in list(environ)}
    for name, value in values.items():
        if value is not None and len(value) >= 8 and SECRET_NAME.search(name) and value in text:
            text = text.replace(value, REDACTED)
    return text


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key[:250], redact(value)[:6000])


def plot_accuracy_matrix(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(results["acc_matrix"])
    tasks = results["tasks"]
    figure, axis = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.6 * len(matrix) + 1.5))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(tasks)), tasks)
    axis.set_yticks(range(len(matrix)), ["base", *(f"after {t}" for t in tasks)])
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black")
    axis.set_title(f"accuracy matrix — {results['method']}")
    figure.colorbar(image)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_forgetting_curves(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(results["acc_matrix"])
    stages = np.arange(len(matrix))
    learned = [matrix[i, :i].mean() if i else np.nan for i in stages]  # mean over tasks learned so far
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(stages, learned, marker="o", label="understanding: mean acc on tasks learned so far")
    axis.plot(stages, results["gen_acc"], marker="s", label="generation: classifier-judged accuracy")
    axis.set_xticks(stages, ["base", *(f"+{t}" for t in results["tasks"])])
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("stage")
    axis.set_title(f"intra- vs inter-modal forgetting — {results['method']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
