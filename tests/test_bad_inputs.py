"""The bad-input table: every case is one line on stderr naming the field/file and the fix, exit code
2, no Ray started and nothing written (in-process through the CLI's own `main`)."""

from __future__ import annotations

import json
import os
import time
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
    "binary space file": (
        lambda t: ["validate", _write_bytes(t, "space.yaml", bytes(range(256)))],  # 0x00-0x7f is valid UTF-8
        "space.yaml: not UTF-8 text (byte 0x80 at offset 128)",
    ),
    "binary config file": (
        lambda t: ["run", _write_bytes(t, "run.yaml", b"\x89PNG\r\n\x1a\n\xff")],
        "run.yaml: not UTF-8 text (byte 0x89 at offset 0)",
    ),
    "binary config file, dry run": (
        lambda t: ["run", _write_bytes(t, "run.yaml", b"\x89PNG\r\n\x1a\n\xff"), "--dry-run"],
        "run.yaml: not UTF-8 text (byte 0x89 at offset 0)",
    ),
    "binary space file to sweep": (
        lambda t: ["sweep", _write_bytes(t, "space.yaml", b"\xff\xfe\x00")],
        "space.yaml: not UTF-8 text (byte 0xff at offset 0)",
    ),
    "binary run_config of a space": (
        lambda t: ["validate", _space(t, "", run_config=_write_bytes(t, "run.yaml", b"tasks: [\xc3(]"))],
        "run.yaml: not UTF-8 text (byte 0xc3 at offset 8)",
    ),
    "config file above 1 MiB": (  # invalid after the padding too: read whole, it fails elsewhere, fast
        lambda t: ["run", _write(t, "run.yaml", "#" * (1 << 20) + "\ntrian: {}\n"), "--dry-run"],
        "run.yaml: larger than 1 MiB",
    ),
    "YAML alias bomb": (  # 300 bytes that expand to over 10**6 values
        lambda t: ["validate", _write(t, "space.yaml", _alias_bomb(levels=5))],
        "space.yaml: expands to more than 100,000 values",
    ),
    "rank above the layer width": (
        lambda t: ["run", "--set", "method.r=100000000"],
        "method.r: adapter rank 100000000 is above the width of gate_proj (128→344); use at most 128",
    ),
    "rank above the layer width, dry run": (
        lambda t: ["run", "--dry-run", "--set", "method.r=100000000"],
        "method.r: adapter rank 100000000 is above the width of gate_proj (128→344); use at most 128",
    ),
    "rank above the layer width in a space": (
        lambda t: ["sweep", _space(t, "fixed: {method.r: 100000000}\n")],
        "fixed.method.r: adapter rank 100000000 is above the width of gate_proj",
    ),
    "adapter above memory": (  # ~1.1 TiB to train this adapter: above any one machine's memory
        lambda t: ["run", "--set", "method.r=128", "--set", "method.num_experts=100000"],
        "method.r: training needs about 1,080.4 GiB per worker (frozen weights 3.1 MiB + adapters with "
        "gradients and AdamW state 1,080.3 GiB + activations and logits 22.1 MiB; the estimate of",
    ),
    "model above memory": (  # 4 layers of 10**6 x 10**6 projections: ~58 TiB of fp32 weights
        lambda t: ["run", "--dry-run", "--set", "base.hidden_size=1000000"],
        "base.hidden_size: training needs about 59,789.6 GiB per worker (frozen weights 59,620.3 GiB",
    ),
    "12 orders of unknown tasks": (
        lambda t: ["validate", _space(t, "grid:\n  tasks: {all_orders_of: [big, a, b, c, d, e, f, g, h, i, j, k]}\n")],
        "grid.tasks.all_orders_of: unknown task 'big'",
    ),
    "permutations of unknown tasks": (
        lambda t: ["validate", _space(t, "grid:\n  tasks: {permutations: 3, of: [prime, parit]}\n")],
        "grid.tasks.of: unknown task 'parit'; did you mean 'parity'?",
    ),
    "sweep above max_trials": (
        lambda t: ["validate", _space(t, "grid:\n  tasks: {permutations: 1000000000, of: [prime, parity]}\n")],
        "max_trials: this sweep has 1,000,000,000 trials",
    ),
    "all orders of 6 tasks x 2 seeds": (  # 6! x 2 = 1,440
        lambda t: ["validate", _space(t, f"seeds: [0, 1]\ngrid:\n  tasks: {{all_orders_of: {ALL_TASKS}}}\n")],
        "max_trials: this sweep has 1,440 trials (grid 720, + 0 extra, x 2 seeds x 1 samples), above the limit "
        "of 1,000; shrink the grid or set max_trials: 1440 in the space file",
    ),
    "grid product above max_trials": (  # 40 x 30 = 1,200, with num_samples 1
        lambda t: ["sweep", _space(t, f"grid:\n  method.r: {list(range(1, 41))}\n  train.lr: {_lrs(30)}\n")],
        "max_trials: this sweep has 1,200 trials (grid 40 x 30, + 0 extra, x 1 seeds x 1 samples)",
    ),
    "num_samples above max_trials": (
        lambda t: ["validate", _space(t, "num_samples: 5000\n")],
        "max_trials: this sweep has 5,000 trials",
    ),
    "max_trials below the sweep": (
        lambda t: ["validate", _space(t, "max_trials: 3\ngrid:\n  method.r: [2, 4, 8, 16]\n")],
        "max_trials: this sweep has 4 trials",
    ),
    "max_trials 0": (lambda t: ["validate", _space(t, "max_trials: 0\n")], "max_trials: expected a positive integer"),
    "num_samples 0": (lambda t: ["validate", _space(t, "num_samples: 0\n")], "num_samples: expected a positive"),
    "max_concurrent_trials 0": (
        lambda t: ["validate", _space(t, "max_concurrent_trials: 0\n")],
        "max_concurrent_trials: expected a positive integer, got 0",
    ),
    "asha grace_period 0": (
        lambda t: ["validate", _space(t, "scheduler: {type: asha, grace_period: 0}\n")],
        "scheduler.grace_period: expected an integer from 1 to 5",  # the default sequence has 5 tasks
    ),
    "asha grace_period above max_t": (
        lambda t: ["validate", _space(t, "scheduler: {type: asha, grace_period: 6}\n")],
        "scheduler.grace_period: expected an integer from 1 to 5 (tasks in the longest sequence), got 6",
    ),
    "asha reduction_factor 1": (
        lambda t: ["validate", _space(t, "scheduler: {type: asha, reduction_factor: 1}\n")],
        "scheduler.reduction_factor: expected a number above 1",
    ),
    "asha max_t": (  # not a setting: max_t is the longest sequence's task count
        lambda t: ["validate", _space(t, "scheduler: {type: asha, max_t: 3}\n")],
        "scheduler.max_t: unknown key",
    ),
    "search setting misplaced": (
        lambda t: ["validate", _space(t, "search: {type: random, num_samples: 4}\n")],
        "search.num_samples: unknown key (known: type)",
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


ALL_TASKS = "[parity, bigsmall, prime, square, round, fibonacci]"


def _space(tmp_path: Path, text: str, run_config: str = f"{ROOT}/search_spaces/digits.yaml") -> str:
    return _write(tmp_path, "space.yaml", f"run_config: {run_config}\n{text}")


def _lrs(count: int) -> str:
    return "[" + ", ".join(f"{0.001 * (i + 1):.3f}" for i in range(count)) + "]"


def _alias_bomb(levels: int) -> str:
    """Billion laughs: each level lists the previous one ten times, so the file expands to over
    10**(levels + 1) values (what the config's deep copy would write out)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


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


def test_a_fifo_config_is_refused_without_blocking(tmp_path, capsys):
    """Opening a FIFO for reading blocks until a writer comes: it is refused from its file type."""
    import signal

    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)

    def timed_out(signum, frame):
        raise TimeoutError("reading the FIFO blocked")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(10)
    try:
        code = main(["run", str(fifo), "--dry-run"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run.yaml: cannot be read (not a regular file)" in err[0], err


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        ("tasks: {all_orders_of: [big, a, b, c, d, e, f, g, h, i, j, k]}", "unknown task 'big'"),  # names first
        (f"tasks: {{all_orders_of: {ALL_TASKS}}}\nseeds: [0, 1, 2]", "this sweep has 2,160 trials"),
        ("tasks: {permutations: 1000000000, of: [prime, parity]}", "this sweep has 1,000,000,000 trials"),
        ("method.r: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  method.alpha: " + _lrs(200), "this sweep has 2,000 trials"),
    ],
)
def test_huge_sweeps_are_refused_before_anything_is_enumerated(grid, expected, tmp_path):
    """Each takes milliseconds: the size is computed (n!, products), not enumerated."""
    from orchestrator.space import load_space
    from trainables.config import ConfigError

    (tmp_path / "inputs").mkdir()
    load_space(ROOT / "search_spaces" / "digits_sweep.yaml", cpus_available=2)  # imports done before timing
    path = _space(tmp_path, f"grid:\n  {grid}\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=expected):
        load_space(path, cpus_available=2)
    assert time.perf_counter() - started < 0.5


def test_twelve_coin_task_orders_are_refused_in_milliseconds(tmp_path):
    """CoIN task names are checked only against the imported data, so twelve valid-looking names
    reach the size check: 12! orders, refused from the count."""
    from orchestrator.space import load_space
    from trainables.config import ConfigError

    (tmp_path / "inputs").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    run_config = _write(tmp_path, "coin.yaml", f"tasks: [A, B]\ncoin: {{model: {tmp_path / 'model'}}}\n")
    names = "[A, B, C, D, E, F, G, H, I, J, K, L]"
    with pytest.raises(ConfigError, match="this sweep has 1,000"):  # the CoIN config's imports, before timing
        load_space(_space(tmp_path, "num_samples: 1000000\n", run_config=run_config), cpus_available=2)
    path = _space(tmp_path, f"grid:\n  tasks: {{all_orders_of: {names}}}\n", run_config=run_config)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"this sweep has 479,001,600 trials .* set max_trials: 479001600"):
        load_space(path, cpus_available=2)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ([], "train.batch_size: training needs about 28.6 MiB per worker (frozen weights 3.1 MiB + adapters with "
             "gradients and AdamW state 3.5 MiB + activations and logits 22.1 MiB; the estimate of `mode-cl run "
             "--dry-run`), more than the 16.0 MiB of memory here; lower train.batch_size"),
        (["train.batch_size=1"], None),  # 7.9 MiB: fits
        (["train.batch_size=1", "base.intermediate_size=4000", "method.r=1", "method.num_experts=1"],
         "base.hidden_size: training needs about 27.4 MiB per worker (frozen weights 24.5 MiB"),
        (["train.batch_size=1", "method.num_experts=40"], "method.r: training needs about 32.8 MiB"),
        (["resources.use_gpu=true"], "more than the 16.0 MiB of GPU memory here"),
    ],
)  # fmt: skip
def test_training_memory_is_checked_against_this_machine(sets, expected, tmp_path, capsys, monkeypatch):
    """With 16 MiB of memory (RAM, or GPU memory for use_gpu) the default digits run does not fit;
    the field named is the one behind the largest part of the estimate."""
    from trainables import adapter_budget

    monkeypatch.setattr(adapter_budget, "physical_memory_bytes", lambda: 16 * 2**20)
    monkeypatch.setattr(adapter_budget, "gpu_memory_bytes", lambda: 16 * 2**20 if "use_gpu" in str(sets) else None)
    argv = ["run", "--dry-run", "--work-dir", str(tmp_path / "work")]
    code = main([*argv, *(item for override in sets for item in ("--set", override))])
    captured = capsys.readouterr()
    if expected is None:
        assert code == 0 and "training needs" not in captured.err
        return
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "work").exists()


def test_the_shipped_configs_and_test_micro_runs_need_a_small_part_of_the_memory():
    from tests.conftest import MICRO_RUN
    from trainables.adapter_budget import training_memory
    from trainables.config import load_run_config, load_run_config_dict, parse_set_options

    for config in (
        load_run_config(ROOT / "search_spaces" / "digits.yaml"),
        load_run_config_dict({}, parse_set_options(MICRO_RUN)),
    ):
        assert training_memory(config.method, config._digits_training_shape())["total"] < 0.1  # GiB


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
