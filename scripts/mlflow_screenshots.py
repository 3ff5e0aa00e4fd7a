"""Screenshots of a sweep in the MLflow UI, taken with headless Chromium (for docs/ and checks).

    python scripts/mlflow_screenshots.py SWEEP_NAME [--work-dir mode-cl-work] [--out docs/img]

Starts the project's MLflow server, opens the sweep's experiment (parent run with its children),
a child run's metrics and its accuracy-matrix plot, and writes one PNG per page.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.mlflow_server import tracking_server

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1500,1000", "--virtual-time-budget=15000",
]  # fmt: skip


def shoot(url: str, target: Path, profile: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium found: apt-get install chromium")
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={target}", url]
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    print(f"{target}  ←  {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    parser.add_argument("--work-dir", default="mode-cl-work")
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tracking_server(Path(args.work_dir) / "mlflow") as uri:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(args.sweep)
        if experiment is None:
            raise SystemExit(f"no MLflow experiment named {args.sweep!r}")
        runs = client.search_runs([experiment.experiment_id])
        child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags and r.data.tags.get("method") == "mode")
        base = f"{uri}/#/experiments/{experiment.experiment_id}"
        profile = out / ".chromium-profile"
        # MLflow 3.17's UI opens in its GenAI view unless the link asks for the model-training one
        # (as `mode-cl ui` prints it).
        view = "?workflowType=machine_learning"
        shoot(f"{base}/runs{view}", out / "mlflow_sweep_runs.png", profile)
        shoot(f"{base}/runs/{child.info.run_id}/model-metrics{view}", out / "mlflow_trial_metrics.png", profile)
        shoot(
            f"{base}/runs/{child.info.run_id}/artifacts/forgetting_curves.png{view}",
            out / "mlflow_trial_plots.png",
            profile,
        )
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        shoot(f"{base}/runs/{parent.info.run_id}/artifacts/pareto.png{view}", out / "mlflow_sweep_pareto.png", profile)
        groups = f"{base}/runs/{parent.info.run_id}/artifacts/groups/groups_stages.png{view}"
        shoot(groups, out / "mlflow_sweep_groups.png", profile)
        children = [r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        ids = ",".join(f"%22{run_id}%22" for run_id in children)
        compare = f"{uri}/#/compare-runs?runs=[{ids}]&experiments=[%22{experiment.experiment_id}%22]"
        compare += "&workflowType=machine_learning"
        shoot(compare, out / "mlflow_sweep_children.png", profile)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
