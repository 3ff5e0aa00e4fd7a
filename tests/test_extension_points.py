"""Extension points: a method registered from outside ``trainables/`` trains, checkpoints and resumes
exactly through every engine hook; MoDE attaches to a vocabulary without a separator token."""

from __future__ import annotations

import shutil
from typing import Any

import torch

from tests.conftest import MICRO_RUN
from trainables.batching import Batch
from trainables.benchmarks.digits.tiny import ChameleonShape, build_tiny_chameleon, make_vocabulary_map
from trainables.config import load_run_config
from trainables.engine import METHOD_STATE, run_sequence
from trainables.methods import register_method
from trainables.methods.seq_lora import SeqLoRA
from trainables.mode import MoDEConfig, attach_mode, record_routing
from trainables.run_context import RunContext
from trainables.vocab import DEFAULT_SEPARATOR, ImageTokenIds


@register_method
class ToyReplay(SeqLoRA):
    """One LoRA plus a memory of the first samples of every finished task, replayed each step.
    Uses every hook: state (the memory and a log of hook calls), before/after task, extra batches."""

    NAME = "toy_replay_for_tests"
    PER_TASK = 4

    def __init__(self, config, token_ids) -> None:
        super().__init__(config, token_ids)
        self.memory: list[list[int]] = []
        self.calls: list[str] = []

    def before_task(self, model, task_index: int, run: RunContext) -> None:
        self.calls.append(f"before {task_index}")

    def after_task(self, model, task_index: int, run: RunContext) -> None:
        self.calls.append(f"after {task_index}")
        samples = run.bench.train_set(run.config.tasks[task_index])
        self.memory += [list(samples.sequences[i]) for i in range(self.PER_TASK)]

    def extra_batches(self, model, task_index: int, step: int, run: RunContext) -> dict[str, Any]:
        if not self.memory:
            return {}
        pick = torch.randint(len(self.memory), (2,), generator=run.generator(task_index, step, 7)).tolist()
        width = max(len(self.memory[i]) for i in pick)
        ids = torch.tensor([self.memory[i] + [self.token_ids.pad] * (width - len(self.memory[i])) for i in pick])
        return {"memory": Batch(ids, (ids != self.token_ids.pad).long(), torch.zeros(len(pick), dtype=torch.bool))}

    def loss_terms(self, model, batch, memory: Batch | None = None, **extra):
        terms = super().loss_terms(model, batch)
        if memory is not None:
            terms["replay"] = 0.5 * super().loss_terms(model, memory)["task"]
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"memory": [torch.tensor(s) for s in self.memory], "calls": list(self.calls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = [s.tolist() for s in state.get("memory", [])]
        self.calls = list(state.get("calls", []))


def _comparable(results):
    return {k: v for k, v in results.items() if k not in ("task_log", "profile")}


def test_a_method_registered_from_a_test_trains_checkpoints_and_resumes_exactly(tmp_path):
    config = load_run_config(
        None, [*MICRO_RUN, f"method={ToyReplay.NAME}", "checkpoint.every_steps=2", "checkpoint.num_to_keep=0"]
    )
    full = run_sequence(config, tmp_path / "work", tmp_path / "full", log=lambda _: None)
    final = tmp_path / "full" / "checkpoints" / "ckpt_t02_s000000" / "adapter"
    state = torch.load(final / METHOD_STATE, weights_only=True)
    assert state["calls"] == ["before 0", "after 0", "before 1", "after 1"]
    assert len(state["memory"]) == 2 * ToyReplay.PER_TASK
    assert all(len(losses) == 3 for losses in full["losses"])  # 48 samples, batch 16, 1 epoch

    # Crash two steps into task 2: the memory of task 1 must come back from the checkpoint, and
    # before_task must not run again for a task resumed in its middle.
    shutil.copytree(tmp_path / "full", tmp_path / "crashed")
    for directory in (tmp_path / "crashed" / "checkpoints").iterdir():
        if directory.name > "ckpt_t01_s000002":
            shutil.rmtree(directory)
    (tmp_path / "crashed" / "results.json").unlink()
    resumed = run_sequence(config, tmp_path / "work", tmp_path / "crashed", log=lambda _: None)
    assert _comparable(resumed) == _comparable(full)
    again = torch.load(tmp_path / "crashed" / "checkpoints" / "ckpt_t02_s000000" / "adapter" / METHOD_STATE)
    assert again["calls"] == state["calls"]
    assert all(torch.equal(a, b) for a, b in zip(again["memory"], state["memory"], strict=True))


def test_attach_mode_needs_no_separator_token():
    vocabulary = make_vocabulary_map(("draw", "two"), 16)
    del vocabulary[DEFAULT_SEPARATOR]  # e.g. a checkpoint whose end-of-turn token has another name
    model = build_tiny_chameleon(vocabulary, ChameleonShape(32, 64, 1, 4, max_position_embeddings=256))
    model = attach_mode(model, MoDEConfig(r=2, num_experts=2, dropout=0.0)).eval()
    ids = ImageTokenIds.from_model(model)
    tokens = [vocabulary["<s>"], vocabulary["draw"], ids.begin_image, *ids.image_codes[:3], ids.end_image]
    with torch.no_grad(), record_routing(model) as records:
        model(input_ids=torch.tensor([tokens]))
    assert records
    assert records[0]["image_mask"][0].tolist() == [False, False, True, True, True, True, True]
