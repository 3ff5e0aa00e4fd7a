"""Per-sample predictions of every evaluation stage, and every metric recomputed from them."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tests.conftest import MICRO_RUN
from trainables.config import load_run_config
from trainables.engine import run_sequence


def test_predictions_recompute_every_logged_metric(micro_work_dir, tmp_path, capsys):
    from orchestrator.cli import main

    config = load_run_config(None, list(MICRO_RUN))
    results = run_sequence(config, micro_work_dir, tmp_path / "run", log=lambda _: None)
    table = pq.read_table(tmp_path / "run" / "predictions.parquet").to_pylist()
    stages, tasks = len(results["acc_matrix"]), results["tasks"]
    answers = [r for r in table if r["kind"] == "answer"]
    drawn = [r for r in table if r["kind"] == "generation"]
    # every stage scores every task's 24 test samples and draws 2 images per digit
    assert len(answers) == stages * len(tasks) * 24
    assert {r["stage"] for r in drawn} == set(range(stages)) and len(drawn) == stages * 10 * 2
    assert {r["target"] for r in answers} <= {"yes", "no"}
    for stage in range(stages):  # the table alone gives the logged accuracy of every cell
        for j, task in enumerate(tasks):
            mine = [r["correct"] for r in answers if r["stage"] == stage and r["task"] == task]
            assert sum(mine) / len(mine) == results["acc_matrix"][stage][j]
    assert main(["report", str(tmp_path / "run"), "--recompute"]) == 0
    assert "1 of 1 runs recompute to their logged metrics" in capsys.readouterr().out
    # a logged value that the predictions do not give is found
    tampered = json.loads((tmp_path / "run" / "results.json").read_text())
    tampered["acc_matrix"][1][0] += 0.01
    (tmp_path / "run" / "results.json").write_text(json.dumps(tampered))
    assert main(["report", str(tmp_path / "run"), "--recompute"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "acc_matrix" in out and "0 of 1 runs" in out
