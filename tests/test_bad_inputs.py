"""The bad-input table: every case is one line on stderr naming the field/file and the fix, exit code
2, no Ray started and nothing written (in-process through the CLI's own `main`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD_RUN = yaml.safe_load((ROOT / "search_spaces" / "digits.yaml").read_text())


def _run_config(tmp_path: Path, **changes) -> str:
    data = json.loads(json.dumps(GOOD_RUN))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "inputs" / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


CASES = {
    "malformed YAML": (lambda t: ["run", _write(t, "run.yaml", "tasks: [prime\n")], "is not valid YAML"),
    "wrong type": (lambda t: ["run", _run_config(t, train__lr="fast")], "train.lr: expected a number"),
    "unknown key": (lambda t: ["run", _write(t, "run.yaml", "trian: {lr: 0.1}\n")], "did you mean 'train'"),
    "empty task list": (lambda t: ["run", _run_config(t, tasks=[])], "tasks: expected a non-empty list"),
    "rank 0": (lambda t: ["run", _run_config(t, method__r=0)], "method.r: must be > 0"),
    "negative rank": (lambda t: ["run", "--set", "method.r=-4"], "method.r: must be > 0"),
    "negative lambda": (lambda t: ["run", _run_config(t, method__kd_weight=-0.3)], "method.kd_weight: must be ≥ 0"),
    "NaN lambda": (lambda t: ["run", "--set", "method.kd_weight=.nan"], "method.kd_weight: must be a finite number"),
    "unknown task": (lambda t: ["run", "--set", "tasks=[prime, parit]"], "did you mean 'parity'"),
    "duplicate tasks": (lambda t: ["run", "--set", "tasks=[prime, prime]"], "appear more than once"),
    "unknown method": (lambda t: ["run", "--set", "method=mod"], "unknown method 'mod'"),
    "bad --set": (lambda t: ["run", "--set", "method.r"], "expected KEY=VALUE"),
    "config file missing": (lambda t: ["run", str(t / "inputs" / "nope.yaml")], "config file not found"),
    "unreadable config file": (lambda t: ["run", _unreadable(t)], "cannot be read"),
    "model path missing": (
        lambda t: [
            "run",
            "--set",
            f"coin={{model: {t / 'no-model'}, data_dir: {t / 'no-data'}}}",
            "--set",
            "tasks=[ScienceQA]",
        ],
        "coin.model",
    ),
    "space file missing": (lambda t: ["sweep", str(t / "inputs" / "none.yaml")], "not found"),
    "space bad rank": (
        lambda t: [
            "sweep",
            _write(t, "space.yaml", f"run_config: {ROOT}/search_spaces/digits.yaml\ngrid:\n  method.r: [4, 0]\n"),
        ],
        "grid.method.r[1]: must be > 0",
    ),
    "binary space file": (lambda t: ["validate", _write_bytes(t, "space.yaml", bytes(range(256)))], "cannot be read"),
    "binary config file": (lambda t: ["run", _write_bytes(t, "run.yaml", b"\x89PNG\r\n\x1a\n\xff")], "cannot be read"),
    "rank above the layer width": (
        lambda t: ["run", "--set", "method.r=100000000"],
        "method.r: adapter rank 100000000 is above the width of gate_proj (128→344); use at most 128",
    ),
    "adapter above memory": (  # ~1.1 TiB to train this adapter: above any one machine's memory
        lambda t: ["run", "--set", "method.r=128", "--set", "method.num_experts=100000"],
        "GiB (parameters x 16 bytes)",
    ),
    "12 orders of unknown tasks": (
        lambda t: ["validate", _space(t, "grid:\n  tasks: {all_orders_of: [big, a, b, c, d, e, f, g, h, i, j, k]}\n")],
        "grid.tasks.all_orders_of: unknown task 'big'",
    ),
    "sweep above max_trials": (
        lambda t: ["validate", _space(t, "grid:\n  tasks: {permutations: 1000000000, of: [prime, parity]}\n")],
        "max_trials: this sweep has 1,000,000,000 trials",
    ),
    "asha grace_period 0": (
        lambda t: ["validate", _space(t, "scheduler: {type: asha, grace_period: 0}\n")],
        "scheduler.grace_period: expected an integer from 1 to 5",  # the default sequence has 5 tasks
    ),
    "asha reduction_factor 1": (
        lambda t: ["validate", _space(t, "scheduler: {type: asha, reduction_factor: 1}\n")],
        "scheduler.reduction_factor: expected a number above 1",
    ),
    "resume unknown sweep": (lambda t: ["resume", "never-ran"], "no sweep at"),
    "report unknown sweep": (lambda t: ["report", "never-ran"], "no sweep at"),
    "gc unknown sweep": (lambda t: ["gc", "never-ran"], "no sweep at"),
    "object-store sweep storage": (
        lambda t: ["sweep", f"{ROOT}/search_spaces/digits_sweep.yaml", "--storage", "s3://b/p"],
        "sweeps need a filesystem path",
    ),
}
WORK_DIR_COMMANDS = {"run", "sweep", "resume", "report", "gc"}


def _write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / "inputs" / name).write_bytes(data)
    return str(tmp_path / "inputs" / name)


def _space(tmp_path: Path, text: str) -> str:
    return _write(tmp_path, "space.yaml", f"run_config: {ROOT}/search_spaces/digits.yaml\n{text}")


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / "inputs" / name).write_text(text)
    return str(tmp_path / "inputs" / name)


def _unreadable(tmp_path: Path) -> str:
    path = tmp_path / "inputs" / "locked.yaml"
    path.mkdir()  # a directory where a file is expected: unreadable as a config on any user, root included
    return str(path)


def _invoke(tmp_path: Path, argv: list[str], capsys) -> tuple[int, list[str]]:
    import ray

    command = argv[0]
    if command in WORK_DIR_COMMANDS:
        argv = [*argv, "--work-dir", str(tmp_path / "work")]
        if command in {"sweep", "resume", "report", "gc"} and "--storage" not in argv:
            argv += ["--storage", str(tmp_path / "work" / "sweeps")]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert not ray.is_initialized()
    return code, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_started_nothing_written(case, tmp_path, capsys, monkeypatch):
    (tmp_path / "inputs").mkdir()
    monkeypatch.chdir(tmp_path)
    build, expected = CASES[case]
    argv = build(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = _invoke(tmp_path, argv, capsys)
    assert code == 2, err
    assert len(err) == 1 and expected in err[0], err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


NOT_POSITIVE = st.one_of(
    st.integers(max_value=0),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (v == v and 0 < v < float("inf"))),
    st.text(alphabet="abcxyz ", max_size=5),  # no digits: "1" would be read as the number 1.0
    st.booleans(),
)
FIELDS = ["method.r", "method.num_experts", "train.epochs", "train.batch_size", "method.alpha", "train.lr"]
FIELDS += ["method.kd_weight", "train.grad_clip", "resources.num_workers"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=NOT_POSITIVE)
def test_any_non_positive_or_non_numeric_value_is_refused_in_one_line(field, value, tmp_path, capsys):
    if field == "method.kd_weight" and isinstance(value, int | float) and not isinstance(value, bool) and value == 0:
        return  # λ = 0 is valid (no distillation)
    code = main(["run", "--set", f"{field}={json.dumps(value)}", "--work-dir", str(tmp_path / "w"), "--no-ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0], (value, err)
    assert not (tmp_path / "w").exists()


def test_resuming_a_run_with_a_different_config_is_refused_with_the_diff(tmp_path, capsys):
    from tests.conftest import MICRO_RUN

    common = ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "run"), "--no-ray"]
    sets = [item for override in MICRO_RUN for item in ("--set", override)]
    assert main(["run", *sets, *common]) == 0
    capsys.readouterr()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["run", *sets, "--set", "method.r=3", "--set", "train.lr=0.01", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists with a different config" in err[0], err
    assert "method.r: 2 → 3" in err[0] and "train.lr: 0.003 → 0.01" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
