"""Sweep spaces: the shipped ones are valid; bad ones fail in one line naming the YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.space import load_space
from trainables.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
name: s
run_config: {run}
grid:
  method.r: [4, 8]
  method.kd_weight: [0.1, 0.3]
  tasks: {orders: [[prime, parity], [parity, prime]]}
extra_trials: [{method.name: seq_lora}]
seeds: [0, 1]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text.replace("{run}", str(ROOT / "search_spaces" / "digits.yaml")))
    return path


def test_shipped_sweep_space_has_the_required_trials():
    space = load_space(ROOT / "search_spaces" / "digits_sweep.yaml", cpus_available=2)
    methods = [space.trial_config(t).method.name for t in space.trials]
    assert methods.count("mode") == 8 and "seq_lora" in methods and "moelora" in methods
    ranks = {space.trial_config(t).method.r for t in space.trials if "method.r" in t}
    assert ranks == {4, 8}


def test_grid_expansion_extras_and_seeds(tmp_path):
    space = load_space(write(tmp_path, GOOD), cpus_available=2)
    assert space.size == (2 * 2 * 2 + 1) * 2
    assert space.trial_config(space.trials[0]).tasks == ("prime", "parity")


def test_permutations_are_seeded_and_valid(tmp_path):
    orders = "{orders: [[prime, parity], [parity, prime]]}"
    text = GOOD.replace(orders, "{permutations: 3, of: [prime, parity, fibonacci]}")
    first = load_space(write(tmp_path, text), cpus_available=2).trials
    second = load_space(write(tmp_path, text), cpus_available=2).trials
    assert first == second and len({tuple(t["tasks"]) for t in first if "tasks" in t}) >= 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("method.r: [4, 8]", "method.r: [4, 0]"), r"^grid\.method\.r\[1\]: must be > 0"),
        (("kd_weight: [0.1, 0.3]", "kd_weight: [0.1, -0.3]"), r"^grid\.method\.kd_weight\[1\]: must be ≥ 0"),
        (("method.kd_weight: [0.1, 0.3]", "method.kd_weight: {loguniform: [0, 1]}"), r"loguniform needs low > 0"),
        (("method.r: [4, 8]", "method.rr: [4, 8]"), r"^grid\.method\.rr\[0\]: .*did you mean 'r'"),
        (("[parity, prime]]", "[parity, parity]]"), r"^grid\.tasks\[1\]: .*more than once"),
        (("[parity, prime]]", "[parity, colour]]"), r"^grid\.tasks\[1\]: .*unknown task 'colour'"),
        (("seeds: [0, 1]", "seeds: [zero]"), r"^seeds: expected a non-empty list of integers"),
        (("seeds: [0, 1]", "seedz: [0]"), r"^seedz: unknown key; did you mean 'seeds'"),
        (("method.r: [4, 8]", "method.r: four"), r"^grid\.method\.r: expected a non-empty list"),
        (("seeds: [0, 1]", "seeds: [0]\nobjective: {metric: accuracy}"), r"^objective\.metric: unknown metric"),
        (("seeds: [0, 1]", "seeds: [0]\nscheduler: {type: hyperband}"), r"^scheduler\.type: expected fifo or asha"),
        (("seeds: [0, 1]", "seeds: [0]\nfixed: {resources.cpus_per_worker: 64}"), r"needs 64 CPUs but only 2"),
        (("seeds: [0, 1]", "seeds: [0]\nsearch: {type: optuna}"), r"^(search\.type: optuna is not|grid: optuna)"),
        (("seeds: [0, 1]", "seeds: [0]\nscheduler: asha"), r"^scheduler: expected a mapping"),
        (("seeds: [0, 1]", "seeds: [0]\nobjective: avg_acc"), r"^objective: expected a mapping"),
        (("run_config: {run}", "run_config: [a]"), r"^run_config: expected the path"),
        (("{orders: [[prime, parity], [parity, prime]]}", "{all_orders_of: 3}"), r"^grid\.tasks\.all_orders_of"),
        (("method.r: [4, 8]", "method.r: {loguniform: [4, 16]}"), r"method\.r takes integers"),
        (("seeds: [0, 1]", "seeds: [0]\nfixed: {eval.generation: base_and_final}"
          "\nobjective: {metric: gen_fd, mode: min}\nscheduler: {type: asha}"),
         r"^scheduler\.type: asha ranks trials by gen_fd after every task"),
        (("extra_trials: [{method.name: seq_lora}]", "extra_trials: [{method.name: seqlora}]"),
         r"^extra_trials\[0\]\.method\.name: .*did you mean 'seq_lora'"),
    ],
)  # fmt: skip
def test_bad_spaces_name_the_yaml_path(tmp_path, change, message):
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError, match=message):
        load_space(write(tmp_path, GOOD.replace(old, new)), cpus_available=2)


def test_validate_command_exit_codes(tmp_path, capsys):
    assert main(["validate", str(ROOT / "search_spaces" / "digits_sweep.yaml")]) == 0
    assert "10 trials" in capsys.readouterr().out
    bad = write(tmp_path, GOOD.replace("method.r: [4, 8]", "method.r: [4, -1]"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mode-cl: error: grid.method.r[1]:") and "\n" not in err
    assert main(["sweep", str(bad), "--work-dir", str(tmp_path / "w")]) == 2
    assert not (tmp_path / "w").exists()  # nothing started, nothing written
    assert main(["report", "nope", "--storage", str(tmp_path)]) == 2
    assert "no sweep at" in capsys.readouterr().err
