"""The engine end to end on a 2-task micro configuration, and the run config validation."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from trainables.config import ConfigError, load_run_config
from trainables.engine import run_sequence

MICRO = [
    "tasks=[parity, bigsmall]",
    "base.hidden_size=32",
    "base.intermediate_size=64",
    "base.num_hidden_layers=1",
    "base.epochs=1",
    "data.task_train=48",
    "data.task_test=24",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.gen_samples_per_digit=2",
    "method.r=2",
    "method.num_experts=2",
]


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def test_micro_sequence_produces_results_and_checkpoints(work_dir, tmp_path):
    config = load_run_config(None, MICRO)
    results = run_sequence(config, work_dir, tmp_path / "out", log=lambda _: None)
    assert results["tasks"] == ["parity", "bigsmall"]
    assert len(results["acc_matrix"]) == 3 and all(len(r) == 2 for r in results["acc_matrix"])
    assert len(results["gen_acc"]) == len(results["gen_fd"]) == 3
    assert results["inter_modal_forgetting"] == pytest.approx(results["gen_acc"][0] - results["gen_acc"][-1])
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    for key in ("tasks", "acc_matrix", "avg_acc", "forgetting", "bwt", "gen_acc", "gen_fd", "inter_modal_forgetting"):
        assert key in stored
    assert stored["config"]["method"]["name"] == "mode"
    assert (tmp_path / "out" / "checkpoints" / "task_02" / "adapter.safetensors").is_file()
    # the base model is cached: the second run reuses it and gives identical results (seeded)
    again = run_sequence(config, work_dir, None, log=lambda _: None)
    assert again["acc_matrix"] == results["acc_matrix"] and again["gen_fd"] == results["gen_fd"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.r=0"], "method.r: must be > 0"),
        (["method=mdoe"], "did you mean 'mode'"),
        (["tasks=[parity, parity]"], "more than once"),
        (["tasks=[parity, colour]"], r"tasks\[1\]: unknown task 'colour'"),
        (["tasks=[]"], "non-empty list"),
        (["train.lrr=0.1"], "train.lrr: unknown key; did you mean 'lr'"),
        (["method.kd_weight=-1"], "method.kd_weight: must be ≥ 0"),
        (["method.kd_weight=.nan"], "finite"),
        (["train.epochs=two"], "train.epochs: expected an integer"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_cli_reports_bad_config_in_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [parity\n")
    assert main(["run", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mode-cl: error:") and "not valid YAML" in err and "\n" not in err
    assert main(["run", "--set", "method.r=-1", "--work-dir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()
