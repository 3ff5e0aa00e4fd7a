"""Readable, unique trial names from the swept values."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.space import load_space
from orchestrator.trial_names import TrialNamer


def _trial(overrides: dict, index: int, sampled: dict | None = None) -> SimpleNamespace:
    config = {"trial": overrides, **({"sampled": sampled} if sampled else {})}
    return SimpleNamespace(config=config, trial_id=f"f10d4_{index:05d}")


def test_the_default_sweeps_trials_are_named_by_their_values():
    space = load_space("search_spaces/digits_sweep.yaml")
    namer = TrialNamer.for_trials(space.trials, space.num_samples, bool(space.distributions))
    names = [namer(_trial(t, i)) for i, t in enumerate(space.trials)]
    assert names[:3] == ["mode r4 λ0.1 order-A s0", "mode r4 λ0.1 order-B s0", "mode r4 λ0.3 order-A s0"]
    assert names[-2:] == ["seq_lora s0", "moelora s0"]
    assert len(set(names)) == len(names)
    assert namer.dirname(_trial(space.trials[1], 1)) == "mode_r4_kd0.1_order-B_s0_f10d4_00001"


def test_names_that_could_repeat_carry_the_trial_index():
    trials = [{"method.name": "mode", "seed": 0}]
    namer = TrialNamer.for_trials(trials, num_samples=3, sampled=True)
    first = namer(_trial(trials[0], 0, {"train.lr": 0.0031234}))
    second = namer(_trial(trials[0], 1, {"train.lr": 0.0031234}))
    assert first == "mode s0 lr0.00312 #0" and second.endswith("#1") and first != second
    # an order the space does not list is named by its first task; other keys by their last part
    other = TrialNamer.for_trials([{"tasks": ["a", "b"]}], 1, False)
    assert other.label({"tasks": ["b", "a"], "train.epochs": 3}, {}) == "from-b epochs=3"


def test_the_live_table_shows_progress_and_remaining_time():
    import io

    from rich.console import Console

    from orchestrator.sweep import live_table

    running = SimpleNamespace(
        config={"trial": {"method.r": 8}},
        status="RUNNING",
        last_result={"tasks_done": 2, "avg_acc": 0.61, "gen_acc": 0.9, "time_total_s": 130.0},
    )
    waiting = SimpleNamespace(config={"trial": {"method.r": 4}}, status="PENDING", last_result=None)
    table = live_table([running, waiting], tasks_per_trial=5, caption="[sweep] trials done 0/2")
    console = Console(file=io.StringIO(), width=160)
    console.print(table)
    text = console.file.getvalue()
    # 130 s for 2 tasks → 65 s per task → 3 more tasks ≈ 3:15
    assert "2/5" in text and "0.610" in text and "2:10" in text and "3:15" in text
    assert "0/5" in text and "PENDING" in text and "trials done 0/2" in text


def test_the_final_trial_table_shows_readable_names():
    import io

    from rich.console import Console

    from orchestrator.report import print_trials

    console = Console(file=io.StringIO(), width=300)
    rows = [
        {"trial_id": "f7919_00001", "trial_name": "mode r4 λ0.1 order-B s0", "status": "TERMINATED", "avg_acc": 0.5},
        {"trial_id": "f7919_00002", "status": "TERMINATED", "avg_acc": 0.4},  # a row from before names: its id
    ]
    print_trials(rows, "avg_acc", console)
    text = console.file.getvalue()
    assert "mode r4 λ0.1 order-B s0" in text and "f7919_00001" not in text and "f7919_00002" in text


def test_without_a_live_table_each_line_says_which_trial_finished_which_task(capsys):
    from orchestrator.sweep import progress_callback

    class Trial(SimpleNamespace):
        def __str__(self) -> str:
            return "mode r8 s0"

    trial = Trial(config={"trial": {"tasks": ["parity", "prime", "square"]}}, status="RUNNING", trial_id="t0")
    progress = progress_callback(total=2, metric="avg_acc", mode="max", tasks_per_trial=3, live=False)
    progress.on_trial_result(0, [trial], trial, {"step": 0, "tasks_done": 2, "avg_acc": 0.6125, "gen_acc": 0.9})
    progress.on_trial_result(0, [trial], trial, {"step": 7, "tasks_done": 2})  # a train step: no line
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "[sweep] mode r8 s0: task 2/3 done (avg acc 0.613, gen acc 0.900); trials done 0/2, running 1, "
        "best so far: — (no trial finished yet)"
    ]
