"""LwF: distillation from the model as it was when the task started, on the task's text answers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    MICRO_RUN,
    padded_batch,
    resume_and_compare,
    run_then_crash,
    train_steps,
    two_task_batches,
)
from trainables.losses import causal_lm_logits, task_loss
from trainables.methods import MethodConfig, build_method
from trainables.methods.lwf import lwf_distillation


def _lora(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture
def after_task1(make_model, ids, seq):
    """An lwf method whose model has trained 5 steps of task 1 (dropout 0), and the two task batches."""
    torch.manual_seed(0)
    config = MethodConfig(name="lwf", r=2, num_experts=2, dropout=0.0, lora_r=4, lwf_weight=0.5, lwf_temperature=2.0)
    method = build_method(config, ids)
    model = method.attach(make_model()).train()
    task1, task2 = two_task_batches(seq, ids.pad)
    method.before_task(model, 0, None)
    terms = train_steps(method, model, task1, 5)
    assert set(terms) == {"task"}  # the first task has no old model to distil from
    assert method.state_dict() == {}
    return method, model, task1, task2


def test_lwf_term_is_zero_at_the_first_step_of_task_2_and_grows_while_it_trains(after_task1):
    method, model, _, task2 = after_task1
    method.before_task(model, 1, None)
    first = method.loss_terms(model, task2)
    assert set(first) == {"task", "lwf"}
    assert first["lwf"].item() < 1e-7  # old model == new model, teacher and student without dropout
    last = train_steps(method, model, task2, 6)
    assert last["lwf"].item() > 1e-4, last
    # the term is lwf_weight × the documented distillation, from one shared student forward
    with torch.no_grad():
        terms = method.loss_terms(model, task2)
        old = method.old_logits(model, task2.input_ids, task2.attention_mask)
        new = causal_lm_logits(model, task2.input_ids, task2.attention_mask)
        expected = 0.5 * lwf_distillation(old, new, task2, method.token_ids, 2.0)
        assert torch.equal(terms["lwf"], expected)
        reference = task_loss(model, task2.input_ids, task2.attention_mask, task2.is_generation, method.token_ids)
        assert torch.equal(terms["task"], reference)


def test_no_lwf_term_without_weight(make_model, ids, seq):
    method = build_method(MethodConfig(name="lwf", lora_r=2, dropout=0.0, lwf_weight=0.0), ids)
    model = method.attach(make_model())
    method.before_task(model, 1, None)
    assert set(method.loss_terms(model, two_task_batches(seq, ids.pad)[1])) == {"task"}


def test_old_model_stays_the_end_of_task_1_model_and_only_lora_gets_gradient(after_task1):
    method, model, _, task2 = after_task1
    end_of_task1 = _lora(model)
    frozen = copy.deepcopy(model).eval()  # the old model, materialised, to check the live teacher
    method.before_task(model, 1, None)
    train_steps(method, model, task2, 4)
    assert not all(torch.equal(p, end_of_task1[n]) for n, p in _lora(model).items())  # the student moved
    snapshot = method.state_dict()
    assert snapshot.keys() == end_of_task1.keys()
    assert all(torch.equal(snapshot[n], end_of_task1[n]) and not snapshot[n].requires_grad for n in snapshot)
    with torch.no_grad():
        expected = causal_lm_logits(frozen, task2.input_ids, task2.attention_mask)
    assert torch.equal(method.old_logits(model, task2.input_ids, task2.attention_mask), expected)

    # The teacher pass leaves the student as it was: weights, train mode, and its graph.
    before = _lora(model)
    model.zero_grad(set_to_none=True)
    lwf = method.loss_terms(model, task2)["lwf"]
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in _lora(model).items())
    lwf.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(before)  # every LoRA parameter, nothing else
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert all(t.grad is None for t in snapshot.values())


def test_distillation_equals_the_documented_formula_on_a_hand_example(ids, seq):
    what, two = seq.words("what")[0], seq.words("two")[0]
    rows = [
        [ids.bos, what, ids.separator, two, ids.eos],  # answer positions: 2 (→ two), 3 (→ eos)
        seq.generation("draw", [0, 1]),  # an image answer: not distilled
        [ids.bos, what, ids.separator, ids.eos],  # answer position 2 (→ eos); then padding
    ]
    batch = padded_batch(rows, [False, True, False], ids.pad)
    generator = torch.Generator().manual_seed(3)
    old = torch.randn(3, batch.input_ids.shape[1], ids.vocab_size, generator=generator) * 3
    new = torch.randn(3, batch.input_ids.shape[1], ids.vocab_size, generator=generator) * 3
    temperature = 3.0
    got = lwf_distillation(old, new, batch, ids, temperature).item()

    text = [v for v in range(ids.vocab_size) if v not in set(ids.image_codes)]
    assert len(text) == ids.vocab_size - len(ids.image_codes)

    def softmax(z):
        z = np.asarray(z, dtype=np.float64) / temperature
        e = np.exp(z - z.max())
        return e / e.sum()

    kls = []
    for b, t in [(0, 2), (0, 3), (2, 2)]:
        p, q = softmax(old[b, t, text].numpy()), softmax(new[b, t, text].numpy())
        kls.append(float((p * (np.log(p) - np.log(q))).sum()))
    expected = temperature**2 * np.mean(kls)
    assert got == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(got, lwf_distillation(new, old, batch, ids, temperature).item(), rel_tol=1e-3)


def test_resume_inside_task_2_distils_from_the_same_old_model(micro_work_dir, tmp_path):
    overrides = [
        *MICRO_RUN,
        "tasks=[parity, bigsmall, prime]",
        "method.name=lwf",
    ]
    config, full, checkpoints = run_then_crash(overrides, micro_work_dir, tmp_path)
    # The mid-task checkpoint holds the old model: the LoRA as task 1 left it.
    state = torch.load(checkpoints / "ckpt_t01_s000002" / "adapter" / "method_state.pt", weights_only=True)
    end_of_task1 = load_file(str(checkpoints / "ckpt_t01_s000000" / "adapter" / "adapter.safetensors"))
    assert state.keys() == end_of_task1.keys()
    assert all(torch.equal(state[k], end_of_task1[k]) for k in state)
    resume_and_compare(config, micro_work_dir, tmp_path, full, ("adapter.safetensors", "method_state.pt"))
