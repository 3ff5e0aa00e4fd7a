"""O-LoRA: one LoRA per task, earlier ones frozen, the new one penalised towards orthogonality."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MICRO_RUN, resume_and_compare, run_then_crash, train_steps, two_task_batches
from trainables.adapter_io import AdapterMismatchError
from trainables.benchmarks.digits.tiny import TINY_SHAPE, build_tiny_chameleon
from trainables.losses import causal_lm_logits
from trainables.methods import MethodConfig, build_method
from trainables.methods.olora import l2_penalty, olora_layers, orthogonality_loss


def _pairs(model, task):
    return {
        f"{name}.{kind}": getattr(layer, f"olora_{kind}")[task]
        for name, layer in olora_layers(model)
        for kind in ("A", "B")
    }


def _olora(ids, **overrides):
    config = {"name": "olora", "r": 4, "dropout": 0.0, **overrides}
    return build_method(MethodConfig(**config), ids)


def test_task_1_lora_is_frozen_while_task_2_trains(make_model, ids, seq):
    torch.manual_seed(0)
    method = _olora(ids)
    model = method.attach(make_model()).train()
    task1, task2 = two_task_batches(seq, ids.pad)
    method.before_task(model, 0, None)
    assert set(train_steps(method, model, task1, 4)) == {"task"}  # no earlier subspace on the first task
    end_of_task1 = {n: p.detach().clone() for n, p in _pairs(model, 0).items()}
    assert all(p.abs().sum() > 0 for n, p in end_of_task1.items() if n.endswith(".B"))  # task 1 was learned

    method.before_task(model, 1, None)
    trainable = list(method.trainable_parameters(model))
    assert {id(p) for p in trainable} == {id(p) for p in _pairs(model, 1).values()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in trainable}
    start_of_task2 = {n: p.detach().clone() for n, p in _pairs(model, 1).items()}
    terms = train_steps(method, model, task2, 5)
    assert set(terms) == {"task", "orth"} and terms["orth"].item() > 0

    for name, parameter in _pairs(model, 0).items():
        assert parameter.grad is None and not parameter.requires_grad, name
        assert torch.equal(parameter, end_of_task1[name]), name
    moved = [not torch.equal(p, start_of_task2[n]) for n, p in _pairs(model, 1).items()]
    assert all(moved)  # task 2's A and B both trained
    assert all(p.grad is not None for p in _pairs(model, 1).values())


def test_one_rank_r_pair_per_task_on_the_default_tiny_model(vocab, ids):
    method = build_method(MethodConfig(name="olora"), ids)  # r = 8; gate, up, down projections
    model = method.attach(build_tiny_chameleon(vocab, TINY_SHAPE))
    method.before_task(model, 4, None)  # the default five-task sequence
    hidden, intermediate, layers = 128, 344, 4
    per_task = layers * 3 * 8 * (hidden + intermediate)
    assert sum(p.numel() for p in method.trainable_parameters(model)) == per_task == 45_312
    stored = sum(p.numel() for n, p in model.named_parameters() if ".olora_" in n)
    assert stored == 5 * per_task


def test_orthogonality_and_l2_terms_equal_the_formula_on_a_hand_example(make_model, ids, seq):
    method = _olora(ids, r=2, target_modules=("gate_proj",), olora_weight=0.5, olora_l2=0.25)
    model = method.attach(make_model())
    method.before_task(model, 2, None)  # three tasks; the third is current
    layers = olora_layers(model)
    assert len(layers) == 2 and all(layer.num_tasks == 3 for _, layer in layers)
    width = layers[0][1].base_layer.in_features

    def row(entries):
        values = [0] * width
        for position, value in entries.items():
            values[position] = value
        return values

    # Per layer and task: A (2 rows). Task 3 shares coordinates 4 and 5 with task 2 and none with task 1.
    hand = {
        0: [
            [row({0: 1, 1: 2, 3: -1}), row({2: 3, 3: 1})],
            [row({2: 1, 4: 2, 5: -1}), row({3: 2, 4: 1})],
            [row({4: 1, 5: 1, 7: 2}), row({5: -2, 6: 1})],
        ],
        1: [
            [row({0: 2, 5: 1}), row({1: -1, 4: 3})],
            [row({4: 1, 6: 1}), row({0: 1, 7: -2})],
            [row({4: -1, 6: 2}), row({0: 3, 1: 1, 7: 1})],
        ],
    }
    b_current = {0: [[1, -2]] + [[0, 0]] * 5, 1: [[3, 0], [0, 1]]}  # B of the current task, first rows
    with torch.no_grad():
        for index, (_, layer) in enumerate(layers):
            for task in range(3):
                layer.olora_A[task].copy_(torch.tensor(hand[index][task], dtype=torch.float32))
            b = torch.zeros_like(layer.olora_B[2])
            b[: len(b_current[index])] = torch.tensor(b_current[index], dtype=torch.float32)
            layer.olora_B[2].copy_(b)

    expected_orth = 0
    for index in hand:
        current = hand[index][2]
        for earlier in hand[index][:2]:
            for j in range(2):
                for k in range(2):
                    dot = sum(earlier[j][i] * current[k][i] for i in range(width))
                    expected_orth += dot * dot
    # A_t A_3^T — layer 0: task 1: 0 (disjoint coordinates); task 2: [[2 - 1, 2], [1, 0]] → 1 + 4 + 1 = 6
    #             layer 1: task 1: [[0, 6], [-3, -1]] → 46; task 2: [[-1 + 2, 0], [0, 3 - 2]] → 2
    assert expected_orth == 0 + 6 + 46 + 2
    expected_l2 = sum(v * v for index in hand for r in hand[index][2] for v in r)
    expected_l2 += sum(v * v for index in b_current for r in b_current[index] for v in r)

    assert orthogonality_loss(model).item() == expected_orth
    assert l2_penalty(model).item() == expected_l2
    terms = method.loss_terms(model, two_task_batches(seq, ids.pad)[1])
    assert set(terms) == {"task", "orth", "l2"}
    assert terms["orth"].item() == 0.5 * expected_orth and terms["l2"].item() == 0.25 * expected_l2

    # No orthogonality term on the first task, nor without its weight; no L2 term without its weight.
    method.before_task(model, 0, None)
    assert orthogonality_loss(model).item() == 0
    assert set(method.loss_terms(model, two_task_batches(seq, ids.pad)[1])) == {"task", "l2"}
    unweighted = _olora(ids, olora_weight=0.0)
    other = unweighted.attach(make_model())
    unweighted.before_task(other, 1, None)
    assert set(unweighted.loss_terms(other, two_task_batches(seq, ids.pad)[1])) == {"task"}


def test_outputs_equal_the_base_model_before_training_and_under_the_teacher_after(make_model, ids, seq):
    torch.manual_seed(0)
    base = make_model().eval()
    method = _olora(ids)
    model = method.attach(make_model()).eval()
    task1, task2 = two_task_batches(seq, ids.pad)
    with torch.no_grad():
        reference = causal_lm_logits(base, task2.input_ids, task2.attention_mask)
        assert torch.equal(causal_lm_logits(model, task2.input_ids, task2.attention_mask), reference)

    model.train()
    method.before_task(model, 0, None)
    train_steps(method, model, task1, 3)
    method.before_task(model, 1, None)
    train_steps(method, model, task2, 3)
    model.eval()
    with torch.no_grad():
        adapted = causal_lm_logits(model, task2.input_ids, task2.attention_mask)
        assert not torch.allclose(adapted, reference, atol=1e-4)
        with method.teacher(model):
            assert torch.equal(causal_lm_logits(model, task2.input_ids, task2.attention_mask), reference)
        assert torch.equal(causal_lm_logits(model, task2.input_ids, task2.attention_mask), adapted)


def test_save_and_load_restore_every_task_and_the_current_one(make_model, ids, seq, tmp_path):
    torch.manual_seed(0)
    method = _olora(ids)
    model = method.attach(make_model())
    task1, task2 = two_task_batches(seq, ids.pad)
    method.before_task(model, 0, None)
    train_steps(method, model, task1, 2)
    method.before_task(model, 2, None)
    train_steps(method, model, task2, 2)
    method.save(model, tmp_path / "adapter")

    loaded = _olora(ids)
    fresh = loaded.attach(make_model())  # one task pair: grown to the stored three by load
    loaded.load(fresh, tmp_path / "adapter")
    assert loaded.current_task == 2 and loaded.num_tasks == 3
    assert {id(p) for p in loaded.trainable_parameters(fresh)} == {id(p) for p in _pairs(fresh, 2).values()}
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected = causal_lm_logits(model, task2.input_ids, task2.attention_mask)
        assert torch.equal(causal_lm_logits(fresh, task2.input_ids, task2.attention_mask), expected)

    with pytest.raises(AdapterMismatchError, match="r: stored 4 vs model 2"):
        other = _olora(ids, r=2)
        other.load(other.attach(make_model()), tmp_path / "adapter")
    more = _olora(ids)
    bigger = more.attach(make_model())
    more.before_task(bigger, 3, None)
    with pytest.raises(AdapterMismatchError, match="num_tasks: stored 3 vs model 4"):
        more.load(bigger, tmp_path / "adapter")


def test_resume_inside_task_2_reproduces_the_uninterrupted_run(micro_work_dir, tmp_path):
    overrides = [
        *MICRO_RUN,
        "tasks=[parity, bigsmall, prime]",
        "method.name=olora",
    ]
    config, full, checkpoints = run_then_crash(overrides, micro_work_dir, tmp_path)
    state = torch.load(checkpoints / "ckpt_t01_s000002" / "adapter" / "method_state.pt", weights_only=True)
    assert state == {"current_task": 1}
    resume_and_compare(
        config, micro_work_dir, tmp_path, full, ("adapter.safetensors", "adapter_config.json", "method_state.pt")
    )

    # Each task trained its own pair and left the earlier ones as they were.
    stages = [
        load_file(str(checkpoints / f"ckpt_t0{i}_s000000" / "adapter" / "adapter.safetensors")) for i in (1, 2, 3)
    ]
    for task in range(3):
        b_keys = [k for k in stages[0] if k.endswith(f".olora_B.{task}")]
        assert b_keys and all(stages[task][k].abs().sum() > 0 for k in b_keys)  # learned during its task
        if task > 0:
            assert all(stages[task - 1][k].abs().sum() == 0 for k in b_keys)  # untouched before it
        for later in stages[task + 1 :]:
            assert all(torch.equal(later[k], stages[task][k]) for k in stages[task] if k.endswith(f".{task}"))
