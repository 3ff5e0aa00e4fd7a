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
