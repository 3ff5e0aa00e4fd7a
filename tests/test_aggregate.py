"""Mean ± t interval per group, paired differences and seeds needed, on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from orchestrator.aggregate import grouped, grouped_table, paired_differences, seeds_needed, t_interval

T_2 = 4.302652729911275  # t_{2, 0.975}
T_1 = 12.706204736174707  # t_{1, 0.975}


def test_t_interval_by_hand():
    interval = t_interval([1.0, 2.0, 3.0])
    assert (interval.n, interval.mean, interval.std) == (3, 2.0, 1.0)
    assert interval.half == pytest.approx(T_2 / math.sqrt(3))
    assert interval.low == pytest.approx(2.0 - T_2 / math.sqrt(3))
    assert interval.text() == "2.000 ± 2.484"
    one = t_interval([0.5, None, math.nan])  # missing values are left out
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.half) and one.text() == "0.500"
    assert t_interval([]).text() == "—"


def test_seeds_needed_by_hand():
    # std 1, half-width 1: t_{n-1}/sqrt(n) = 8.98 (n 2), 2.48, 1.59, 1.24, 1.05, 0.925 (n 7)
    assert seeds_needed(1.0, 1.0) == 7
    assert seeds_needed(1.0, 2.5) == 3  # 2.484 ≤ 2.5
    assert seeds_needed(0.0, 0.01) == 2
    assert seeds_needed(math.nan, 0.1) is None
    assert seeds_needed(1.0, 1e-6, limit=50) is None


ROWS = [
    {"method": "mode", "seed": 0, "order": "ab", "forgetting": 0.30},
    {"method": "mode", "seed": 1, "order": "ab", "forgetting": 0.40},
    {"method": "mode", "seed": 0, "order": "ba", "forgetting": 0.20},
    {"method": "lora", "seed": 0, "order": "ab", "forgetting": 0.50},
    {"method": "lora", "seed": 1, "order": "ab", "forgetting": 0.50},
    {"method": "lora", "seed": 1, "order": "ba", "forgetting": 0.90},  # no mode partner
]


def test_groups_by_hand():
    (mode_key, mode), (lora_key, lora) = grouped(ROWS, ["method"], ["forgetting"])
    assert mode_key == ("mode",) and lora_key == ("lora",)
    assert mode["forgetting"].mean == pytest.approx(0.30) and mode["forgetting"].std == pytest.approx(0.10)
    assert mode["forgetting"].half == pytest.approx(T_2 * 0.10 / math.sqrt(3))
    assert lora["forgetting"].n == 3 and lora["forgetting"].mean == pytest.approx(19 / 30)


def test_paired_differences_match_seed_and_order():
    [(key, diff)] = paired_differences(ROWS, ["method"], ("method", "lora"), ["seed", "order"], ["forgetting"])
    # pairs (seed 0, ab): 0.30 − 0.50 and (seed 1, ab): 0.40 − 0.50; (seed 0, ba) has no lora partner
    assert key == ("mode",) and diff["forgetting"].n == 2
    assert diff["forgetting"].mean == pytest.approx(-0.15)
    assert diff["forgetting"].half == pytest.approx(T_1 * math.sqrt(0.005) / math.sqrt(2))
    with pytest.raises(ValueError, match="no run has method = 'olora'"):
        paired_differences(ROWS, ["method"], ("method", "olora"), ["seed"], ["forgetting"])
    with pytest.raises(ValueError, match="not one of the grouping keys"):
        paired_differences(ROWS, ["order"], ("method", "lora"), ["seed"], ["forgetting"])


def test_grouped_table_records_and_seeds_needed():
    records = grouped_table(
        ROWS, ["method"], ["forgetting"], baseline=("method", "lora"), pair_on=["seed", "order"], half_width=0.1
    )
    assert [(r["kind"], r["method"], r["forgetting_n"]) for r in records] == [
        ("group", "mode", 3),
        ("group", "lora", 3),
        ("difference", "mode", 2),
    ]
    # mode: std 0.1 → the smallest n with t_{n-1}·0.1/√n ≤ 0.1 is 7 (as in the hand case above)
    assert records[0]["forgetting_seeds_needed"] == 7


TRIALS = [
    {"trial_id": f"t{i}", "status": "TERMINATED", "config.method.name": m, "config.seed": s, "config.tasks": o,
     "avg_acc": acc, "forgetting": f}
    for i, (m, s, o, acc, f) in enumerate(
        [("mode", 0, "a,b", 0.6, 0.30), ("mode", 1, "a,b", 0.8, 0.40), ("seq_lora", 0, "a,b", 0.5, 0.50),
         ("seq_lora", 1, "a,b", 0.5, 0.50)]
    )
]  # fmt: skip


@pytest.fixture
def sweep_rows(monkeypatch, tmp_path):
    monkeypatch.setattr("orchestrator.sweep.trial_table", lambda directory: TRIALS)
    monkeypatch.setattr("orchestrator.sweep_store.find_sweep", lambda name, storage: tmp_path)
    return tmp_path


def test_report_group_by_prints_groups_differences_and_seeds_needed(sweep_rows, capsys):
    from orchestrator.cli import main

    # by default every swept key but the seed groups: here method and task order
    assert main(["report", "s", "--group-by", "--baseline", "method.name=seq_lora", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "grouped by method.name, tasks" in out and "paired by seed" in out
    argv = ["report", "s", "--group-by", "method.name", "--baseline", "method.name=seq_lora", "--format", "markdown"]
    assert main([*argv, "--half-width", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "grouped by method.name" in out and "paired by seed, tasks" in out
    # mode's avg acc: mean 0.7, std 0.1414, n 2 → half 12.706·0.1414/√2 = 1.271, and for ± 0.1 it
    # needs n = 11 (t_10·0.1414/√11 = 0.095); Δ vs seq_lora: 0.2 ± 1.271, forgetting −0.15 ± 0.635
    assert "|  | mode | 2 | 0.700 ± 1.271 (n≥11) |" in out
    assert "| Δ | mode | 2 | 0.200 ± 1.271 (n≥11) | -0.150 ± 0.635 (n≥5) |" in out
    assert main(["report", "s", "--group-by", "method.name", "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("kind,config.method.name,avg_acc,avg_acc_ci,avg_acc_n") and len(rows) == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--group-by", "method.rank"], "--group-by: 'method.rank' is not a swept key"),
        (["--baseline", "method.name"], "--baseline: expected KEY=VALUE"),
        (["--baseline", "method.name=olora"], "no run has config.method.name = 'olora'"),
        (["--format", "latex"], "--format: latex is for grouped reports"),
        (["--group-by", "--half-width", "0"], "--half-width: must be > 0"),
    ],
)
def test_report_group_by_bad_input_is_one_line(sweep_rows, capsys, argv, message):
    from orchestrator.cli import main

    assert main(["report", "s", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def _result(method: str, seed: int, stage0: list[float], final: list[float], forgetting: float) -> dict:
    """A results.json record as the engine writes it, cut to what a report reads."""
    config = {"seed": seed, "tasks": ["a", "b"], "method": {"name": method, "r": 8}, "data": {"seed": seed}}
    return {
        "config": config,
        "acc_matrix": [stage0, [0.9, stage0[1]], final],
        "open_acc_matrix": [stage0, [0.9, stage0[1]], final],
        "avg_acc": sum(final) / 2,
        "forgetting": forgetting,
        "open_avg_acc": sum(final) / 2,
        "gen_acc": [0.9, 0.8, 0.7 if method == "mode" else 0.1],
        "gen_fd": [1.0, 2.0, 3.0],
        "profile": {"seconds": {"total": 10.0}},
    }


def test_a_sweep_is_grouped_as_a_sweep_and_its_extra_trials_get_their_task_order(monkeypatch, tmp_path, capsys):
    """A sweep folder holds its trials' results.json but is not a results collection (no zero-shot
    row, no config field shown for a trial that did not set it); an extra trial that sets neither
    seed nor tasks is placed in its group by the seed and order its results.json says it ran."""
    import json

    from orchestrator.cli import main
    from orchestrator.report import is_results_collection

    trials = [
        {"trial_id": "t0", "status": "TERMINATED", "config.method.name": "mode", "config.method.r": 4,
         "config.seed": 0, "config.tasks": "a,b", "avg_acc": 0.6, "forgetting": 0.3},
        {"trial_id": "t1", "status": "TERMINATED", "config.method.name": "seq_lora", "avg_acc": 0.5,
         "forgetting": 0.5},
    ]  # fmt: skip
    monkeypatch.setattr("orchestrator.sweep.trial_table", lambda directory: [dict(r) for r in trials])
    monkeypatch.setattr("orchestrator.sweep_store.find_sweep", lambda name, storage: tmp_path)
    (tmp_path / "sweep.json").write_text("{}")
    for trial, method in (("t0", "mode"), ("t1", "seq_lora")):
        (tmp_path / "train" / f"train-{trial}").mkdir(parents=True)
        result = _result(method, 0, [0.5, 0.5], [0.6, 0.6], 0.3)
        (tmp_path / "train" / f"train-{trial}" / "results.json").write_text(json.dumps(result))
    assert not is_results_collection(tmp_path)
    assert main(["report", "s", "--group-by", "--format", "markdown"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|  | ")]
    assert lines[1:] == [
        "|  | mode | 4 | a,b | 1 | 0.600 | 0.300 | 10.000 |",
        "|  | seq_lora | — | a,b | 1 | 0.500 | 0.500 | 10.000 |",
    ]


def test_report_reads_a_results_collection_with_a_zero_shot_row(tmp_path, capsys):
    import json

    from orchestrator.cli import main

    runs = [
        _result("mode", 0, [0.5, 0.4], [0.6, 0.8], 0.3),
        _result("mode", 1, [0.3, 0.4], [0.8, 0.8], 0.1),
        _result("seq_lora", 0, [0.5, 0.4], [0.5, 0.9], 0.4),
        _result("seq_lora", 1, [0.3, 0.4], [0.5, 0.9], 0.4),
    ]
    collection = tmp_path / "runs.jsonl"
    collection.write_text("".join(json.dumps(r) + "\n" for r in runs))
    argv = [
        "report",
        str(collection),
        "--group-by",
        "method.name",
        "--baseline",
        "method.name=mode",
        "--format",
        "json",
    ]
    assert main(argv) == 0
    records = {(r["kind"], r["config.method.name"]): r for r in json.loads(capsys.readouterr().out)}
    # zero-shot: stage 0 of each seed once: avg acc (0.45 + 0.35) / 2 = 0.4; gen acc 0.9; no forgetting
    zero = records[("group", "zero-shot")]
    assert zero["avg_acc"] == pytest.approx(0.4) and zero["gen_acc"] == pytest.approx(0.9)
    assert zero["forgetting_n"] == 0
    # mode: avg acc 0.7 and 0.8 → 0.75; last-stage gen acc 0.7; seq_lora − mode: 0.7 − 0.75 = −0.05
    assert records[("group", "mode")]["avg_acc"] == pytest.approx(0.75)
    assert records[("group", "mode")]["gen_acc"] == pytest.approx(0.7)
    assert records[("difference", "seq_lora")]["avg_acc"] == pytest.approx(-0.05)
    assert records[("difference", "seq_lora")]["forgetting"] == pytest.approx(0.2)
    assert records[("difference", "seq_lora")]["gen_acc_n"] == 2
    # a folder of results.json files reads the same; varying keys only (data.seed follows seed)
    for i, run in enumerate(runs):
        (tmp_path / "out" / f"run{i}").mkdir(parents=True)
        (tmp_path / "out" / f"run{i}" / "results.json").write_text(json.dumps(run))
    assert main(["report", str(tmp_path / "out"), "--group-by", "method.r"]) == 2
    assert "'method.r' is not a swept key" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "out"), "--group-by", "method.name", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4  # header, zero-shot, mode, seq_lora


@pytest.mark.parametrize(
    ("text", "message"), [("{not json\n", "not a results collection"), ("{}\n", "no results.json")]
)
def test_report_of_a_bad_results_collection_is_one_line(tmp_path, capsys, text, message):
    from orchestrator.cli import main

    (tmp_path / "runs.jsonl").write_text(text)
    assert main(["report", str(tmp_path / "runs.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_compare_two_collections_refuses_unnamed_differences(tmp_path, capsys):
    import json

    from orchestrator.cli import main

    def write(name: str, r: int, acc_shift: float) -> str:
        runs = [_result("mode", s, [0.5, 0.4], [0.6 + acc_shift, 0.8 + s / 10], 0.3) for s in (0, 1)]
        for run in runs:
            run["config"]["method"]["r"] = r
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(run) + "\n" for run in runs))
        return str(tmp_path / f"{name}.jsonl")

    a, b, c = write("main", 8, 0.0), write("branch", 8, 0.1), write("rank4", 4, 0.2)
    # equal fixed configs: one group per source; Δ branch − main = 0.1 / 2 = 0.05 on both seeds
    assert main(["compare", a, b, "--baseline", "source=main", "--format", "json"]) == 0
    records = {(r["kind"], r["source"]): r for r in json.loads(capsys.readouterr().out)}
    assert records[("group", "main")]["avg_acc"] == pytest.approx(0.725)
    assert records[("difference", "branch")]["avg_acc"] == pytest.approx(0.05)
    assert records[("difference", "branch")]["avg_acc_n"] == 2
    # a fixed field that differs is refused, naming it, unless --allow-diff names it
    assert main(["compare", a, c]) == 2
    err = capsys.readouterr().err.strip()
    assert "differ in method.r (8 vs 4)" in err and "--allow-diff method.r" in err and "\n" not in err
    assert main(["compare", a, c, "--allow-diff", "method.r", "--format", "csv"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3  # header, one group per source
    assert main(["compare", a]) == 2


def test_compare_a_sweep_with_a_collection(tmp_path, monkeypatch, capsys):
    """A sweep's fixed config is its space's first trial config without the swept keys; a field
    fixed in the collection but swept in the sweep is a column, not a difference."""
    import json
    from pathlib import Path

    from orchestrator.cli import main

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "digits_sweep.yaml"
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({"space": str(space)}))
    monkeypatch.setattr("orchestrator.sweep.trial_table", lambda directory: [dict(r) for r in TRIALS])
    run = json.loads(json.dumps(_result("mode", 0, [0.5, 0.4], [0.6, 0.8], 0.3)))
    (tmp_path / "one.jsonl").write_text(json.dumps(run) + "\n")
    assert main(["compare", str(tmp_path / "sweep"), str(tmp_path / "one.jsonl")]) == 2
    err = capsys.readouterr().err  # the collection's config is not the sweep space's: say which field
    assert "--allow-diff" in err and "sweep and one differ in" in err


def test_the_parent_run_gets_the_grouped_table_and_plot(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep_tracking import ParentRun, log_grouped

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    rows = [{**r, "gen_acc": 0.5, "inter_modal_forgetting": 0.4} for r in TRIALS]
    per_trial = {
        r["trial_id"]: {"acc_matrix": [[0.5, 0.5], [0.9, 0.4], [0.6, 0.8]], "gen_acc": [0.9, 0.7, 0.5]} for r in TRIALS
    }
    log_grouped(ParentRun(uri, experiment, run), rows, final=True, results=per_trial)
    assert {a.path for a in client.list_artifacts(run, "groups")} == {
        "groups/groups.md",
        "groups/groups.parquet",
        "groups/groups.png",
        "groups/groups_stages.png",
    }
    table = (tmp_path / "artifacts" / run / "artifacts" / "groups" / "groups.md").read_text()
    assert "grouped by method.name, tasks" in table and "| mode | a,b | 2 | 0.700 ± 1.271 |" in table


def test_a_sweeps_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's default artifact root is ./mlruns
    from orchestrator.sweep_tracking import EXPERIMENT_KIND_TAG, create_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tmp_path / "space.yaml"
    space.write_text("name: s\n")
    parent = create_parent_run(uri, space, "s")
    client = MlflowClient(uri)
    assert client.get_experiment(parent.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(parent.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    create_parent_run(uri, space, "s")  # the user's choice on an existing experiment stays
    assert client.get_experiment(parent.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
