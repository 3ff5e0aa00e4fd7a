"""Disk hygiene: num_to_keep is honoured; `mode-cl gc` removes a finished trial's earlier checkpoints,
keeps its final one, and leaves unfinished trials alone."""

from __future__ import annotations

import json
import shutil

from orchestrator.cli import main
from tests.conftest import MICRO_RUN
from trainables.checkpoint import LocalCheckpointer, list_checkpoints, read_checkpoint
from trainables.config import load_run_config
from trainables.engine import run_sequence


def test_num_to_keep_and_gc_keep_exactly_what_resume_and_results_need(tmp_path, capsys):
    config = load_run_config(None, [*MICRO_RUN, "checkpoint.every_steps=1", "checkpoint.num_to_keep=3"])
    sweep = tmp_path / "sweeps" / "hygiene"
    (sweep / "train").mkdir(parents=True)
    (sweep / "sweep.json").write_text(json.dumps({"space": "unused"}))
    finished = sweep / "train" / "train-finished"
    checkpointer = LocalCheckpointer(finished, config.checkpoint.num_to_keep, log=lambda _: None)
    run_sequence(config, tmp_path / "work", checkpointer=checkpointer, log=lambda _: None)
    kept = [p.name for p in list_checkpoints(finished)]
    assert len(kept) == 3 and kept[-1] == "ckpt_t02_s000000"  # num_to_keep honoured

    unfinished = sweep / "train" / "train-unfinished"  # a trial stopped before its last task ended
    unfinished.mkdir()
    shutil.copytree(finished / kept[0], unfinished / kept[0])
    assert read_checkpoint(unfinished / kept[0]).progress.next_task < 2

    storage = ["--storage", str(tmp_path / "sweeps"), "--work-dir", str(tmp_path / "work")]
    assert main(["gc", "hygiene", "--dry-run", *storage]) == 0
    assert "would remove 2 checkpoint(s)" in capsys.readouterr().out
    assert len(list_checkpoints(finished)) == 3  # dry run removed nothing
    assert main(["gc", "hygiene", *storage]) == 0
    out = capsys.readouterr().out
    assert "1 finished trial(s): removed 2 checkpoint(s)" in out and "1 unfinished" in out
    assert [p.name for p in list_checkpoints(finished)] == ["ckpt_t02_s000000"]
    read_checkpoint(finished / "ckpt_t02_s000000")  # the final one still verifies
    assert [p.name for p in list_checkpoints(unfinished)] == [kept[0]]
    assert main(["gc", "missing", *storage]) == 2
