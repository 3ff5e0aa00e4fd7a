"""The engine end to end on a 2-task micro configuration, and the run config validation."""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.cli import main
from tests.conftest import MICRO_RUN, crashed_copy
from trainables.config import ConfigError, load_run_config
from trainables.engine import run_sequence

MICRO = MICRO_RUN


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
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert checkpoints == ["ckpt_t01_s000000", "ckpt_t02_s000000"]  # num_to_keep = 2
    assert (tmp_path / "out" / "checkpoints" / "ckpt_t02_s000000" / "adapter" / "adapter.safetensors").is_file()
    assert [(e["task"], e["event"]) for e in results["task_log"]] == [
        (0, "start"),
        (0, "end"),
        (1, "start"),
        (1, "end"),
    ]
    # the base model is cached: the second run reuses it and gives identical results (seeded)
    again = run_sequence(config, work_dir, None, log=lambda _: None)
    assert again["acc_matrix"] == results["acc_matrix"] and again["gen_fd"] == results["gen_fd"]


def _comparable(results):
    return {k: v for k, v in results.items() if k not in ("task_log", "profile")}


def test_resume_mid_task_reproduces_the_uninterrupted_run(work_dir, tmp_path):
    config = load_run_config(None, [*MICRO, "checkpoint.every_steps=2", "checkpoint.num_to_keep=0"])
    full = run_sequence(config, work_dir, tmp_path / "full", log=lambda _: None)
    # Rewind a copy of the run to its checkpoint two steps into task 2, as if it had crashed there.
    crashed_copy(tmp_path / "full", tmp_path / "crashed", "ckpt_t01_s000002")
    messages = []
    resumed = run_sequence(config, work_dir, tmp_path / "crashed", log=messages.append)
    assert any("resuming from checkpoint ckpt_t01_s000002: task 2, step 2" in m for m in messages)
    assert any("training again after the resume: task 2, step 3 done" in m for m in messages)
    assert _comparable(resumed) == _comparable(full)
    events = [(e["task"], e["event"], e["step"]) for e in resumed["task_log"]]
    assert events == [(0, "start", 0), (0, "end", 3), (1, "start", 0), (1, "resume", 2), (1, "end", 3)]
    final = tmp_path / "crashed" / "checkpoints" / "ckpt_t02_s000000" / "adapter" / "adapter.safetensors"
    reference = tmp_path / "full" / "checkpoints" / "ckpt_t02_s000000" / "adapter" / "adapter.safetensors"
    assert final.read_bytes() == reference.read_bytes()


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
        (["train.grad_clip=0"], "train.grad_clip: must be > 0"),
        (["seed=-1"], "seed: must be ≥ 0"),
        (["method.name=[mode]"], "method.name: unknown method"),
        (["seed=2024-01-01"], "seed: expected an integer"),
        (["tasks=[prime, parity"], "not valid YAML"),
        (["base.hidden_size=30"], "multiple of base.num_attention_heads"),
        (["train.warmup_ratio=1.5"], "warmup_ratio must be in"),
    ],
)
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_yaml_floats_without_a_dot_are_numbers(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train: {lr: 3e-3}\n")
    assert load_run_config(config_file).train.lr == 0.003
    config_file.write_text("seed: 2024-01-01\n")
    with pytest.raises(ConfigError, match="unsupported value type"):
        load_run_config(config_file)
    config_file.write_text("just a string\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_run_config(config_file, ["seed=1"])


def test_cli_reports_bad_config_in_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [parity\n")
    assert main(["run", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mode-cl: error:") and "not valid YAML" in err and "\n" not in err
    assert main(["run", "--set", "method.r=-1", "--work-dir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()


def test_cached_teacher_runs_like_the_live_teacher_and_is_shared_between_runs(work_dir, tmp_path):
    messages: list[str] = []
    cached = run_sequence(load_run_config(None, MICRO), work_dir, tmp_path / "cached", log=messages.append)
    live = run_sequence(
        load_run_config(None, [*MICRO, "method.kd_teacher=live"]), work_dir, tmp_path / "live", log=lambda _: None
    )
    # Same arithmetic up to float rounding: losses agree closely, metrics (thresholded) exactly here.
    for cached_losses, live_losses in zip(cached["losses"], live["losses"], strict=True):
        assert cached_losses == pytest.approx(live_losses, rel=1e-4)
    assert cached["acc_matrix"] == live["acc_matrix"]
    phases = {"data", "base_model", "model", "teacher_cache", "evaluate", "train", "checkpoint", "total"}
    assert set(cached["profile"]["seconds"]) >= phases and cached["profile"]["peak_rss_mb"] > 100
    assert "teacher_cache" not in live["profile"]["seconds"]
    messages.clear()
    same_base = [*MICRO, "seed=1", "data.seed=0", "base.seed=0"]  # another run seed on the same data and base
    again = run_sequence(load_run_config(None, same_base), work_dir, tmp_path / "again", log=messages.append)
    assert any("teacher cache" in m and ": read" in m for m in messages)
    assert again["profile"]["seconds"]["teacher_cache"] < cached["profile"]["seconds"]["total"]


def test_lighter_evaluation_schedule_skips_cells_but_not_the_metrics(tmp_path):
    """eval.tasks=learned_and_next and eval.generation=base_and_final evaluate less, and every
    continual-learning metric equals the full schedule's (none of them reads a skipped cell)."""
    three = [*MICRO_RUN, "tasks=[parity, bigsmall, prime]"]
    full = run_sequence(load_run_config(None, three), tmp_path / "work", None, log=lambda _: None)
    light_config = load_run_config(None, [*three, "eval.tasks=learned_and_next", "eval.generation=base_and_final"])
    light = run_sequence(light_config, tmp_path / "work", None, log=lambda _: None)
    assert light_config.config_hash() != load_run_config(None, three).config_hash()
    assert math.isnan(light["acc_matrix"][1][2])  # after task 1: task 3 is neither learned nor next
    cells = [(i, j) for i in range(4) for j in range(3) if (i, j) != (1, 2)]
    assert all(light["acc_matrix"][i][j] == full["acc_matrix"][i][j] for i, j in cells)
    assert [math.isnan(v) for v in light["gen_acc"]] == [False, True, True, False]
    assert light["gen_acc"][0] == full["gen_acc"][0] and light["gen_acc"][-1] == full["gen_acc"][-1]
    for key in ("avg_acc", "forgetting", "bwt", "fwt", "inter_modal_forgetting"):
        assert light[key] == full[key], key
    assert light["losses"] == full["losses"]  # skipping evaluation leaves training untouched
    assert light["profile"]["seconds"]["evaluate"] < full["profile"]["seconds"]["evaluate"]


def test_the_config_defaults_are_the_default_benchmark_file():
    """`mode-cl run` with no file reads search_spaces/digits.yaml, code builds RunConfig from its
    defaults: both must be one config, or a CLI run and an in-process run of "the same" settings
    differ (a changed default in one place only made them differ once)."""
    from pathlib import Path

    shipped = load_run_config(Path(__file__).resolve().parents[1] / "search_spaces" / "digits.yaml", [])
    assert load_run_config(None, []).to_dict() == shipped.to_dict()
