"""CL-MoE: dual-router gates, the per-expert momentum merge after a task, and an exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import MICRO_RUN, resume_and_compare, run_then_crash
from trainables.config_rules import ConfigError
from trainables.methods import MethodConfig, build_method
from trainables.methods.cl_moe import CLMoELinear


def _method(ids, **overrides):
    config = MethodConfig(name="cl_moe", r=2, num_experts=4, dropout=0.0, **overrides)
    return build_method(config, ids)


def _unit(size: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    vector = torch.zeros(size)
    vector[dim] = scale
    return vector


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_dual_router_picks_top_k_local_and_global_experts_on_a_hand_example(make_model, ids):
    method = _method(ids, clmoe_top_k_instance=2, clmoe_top_k_task=1, clmoe_router_mix=0.25)
    method.attach(make_model())
    name, layer = method.layers[0]
    assert isinstance(layer, CLMoELinear) and all(isinstance(m, CLMoELinear) for _, m in method.layers)
    width = layer.base_layer.in_features
    with torch.no_grad():
        layer.mode_text_router.zero_()  # W^I: logits [1, 3, 2, 0] · x[0]
        layer.mode_text_router[:, 0] = torch.tensor([1.0, 3.0, 2.0, 0.0])
        layer.mode_task_router.zero_()  # W^T: task 0's key (dim 2) → expert 0, task 1's key (dim 3) → expert 3
        layer.mode_task_router[0, 2] = 4.0
        layer.mode_task_router[3, 3] = 2.0
    x = torch.stack([_unit(width, 0), _unit(width, 0) + _unit(width, 2, 0.5), _unit(width, 0) + _unit(width, 3, 0.5)])
    x = x[None]  # [1, 3, in]: every token's instance logits are [1, 3, 2, 0]
    e2, e3 = math.exp(2.0), math.exp(3.0)
    local = torch.tensor([0.0, e3 / (e2 + e3), e2 / (e2 + e3), 0.0])  # top-2 {1, 2}, softmax over them

    # Before any task there is no key: the instance-level gate alone.
    torch.testing.assert_close(layer.router_gates(x), local.expand(1, 3, 4))

    layer.task_keys = torch.stack([_unit(width, 2), _unit(width, 3)])
    assert layer.global_experts(0) == [0] and layer.global_experts(1) == [3]
    torch.testing.assert_close(layer.task_gates(), torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]]))

    # Training task 1: every token mixes its local experts with task 1's global expert.
    method.context.task = 1
    expected = 0.25 * local + 0.75 * torch.tensor([0.0, 0, 0, 1])
    torch.testing.assert_close(layer.router_gates(x), expected.expand(1, 3, 4))

    # Evaluation: each token takes the task of its nearest key (token 0 ties at 0 → task 0).
    method.context.task = None
    got = layer.router_gates(x)[0]
    for token, task_expert in [(0, 0), (1, 0), (2, 3)]:
        torch.testing.assert_close(got[token], 0.25 * local + 0.75 * _unit(4, task_expert))
    assert (got[:, [1, 2]] > 0).all() and got.sum(-1).allclose(torch.ones(3))

    # Counting (training forward): each non-padding token adds its top-2 instance experts.
    method.context.task, method.context.count_mask = 1, torch.tensor([[True, True, False]])
    layer.router_gates(x)
    method.context.count_mask = None
    assert layer.instance_counts.tolist() == [0, 2, 2, 0]
    assert name in method.state_dict()["instance_counts"]


def test_momentum_merge_after_task_equals_the_hand_computed_betas(make_model, ids):
    betas = {"shared": 0.5, "new": 0.2, "old": 0.9}
    method = _method(
        ids,
        clmoe_top_k_instance=2,
        clmoe_top_k_task=1,
        clmoe_beta_shared=betas["shared"],
        clmoe_beta_new=betas["new"],
        clmoe_beta_old=betas["old"],
    )
    model = method.attach(make_model())
    (first, layer), (second, _) = method.layers[0], method.layers[1]
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, each in method.layers:  # W^T: task 1's key (dim 0) → expert 2 in every layer
            each.mode_task_router.zero_()
            each.mode_task_router[2, 0] = 5.0

    def rand(tensor):
        return torch.randn(tensor.shape, generator=generator)

    names = [n for n, _ in method.layers]
    widths = {n: m.base_layer.in_features for n, m in method.layers}
    counts = {n: torch.tensor([0, 7, 3, 9]) for n in names}  # local experts {3, 1}
    counts[second] = torch.tensor([5, 0, 0, 1])  # local experts {0, 3}
    state = {
        "task": 1,
        "task_keys": {n: torch.stack([_unit(widths[n], 1), _unit(widths[n], 0)]) for n in names},
        "instance_counts": counts,
        "snapshot": {f"{n}.{p}": rand(getattr(m, p)) for n, m in method.layers for p in ("mode_text_A", "mode_text_B")},
        "selected": [{n: [0, 1] for n in names}],  # task 0 selected experts 0 and 1 everywhere
        "betas": [{n: [] for n in names}],
    }
    method.load_state_dict(_round_trip(state))
    with torch.no_grad():
        for _, each in method.layers:
            each.mode_text_A.copy_(rand(each.mode_text_A))
            each.mode_text_B.copy_(rand(each.mode_text_B))
    new = {n: (m.mode_text_A.detach().clone(), m.mode_text_B.detach().clone()) for n, m in method.layers}
    routers = {n: (m.mode_text_router.detach().clone(), m.mode_task_router.detach().clone()) for n, m in method.layers}

    method.after_task(model, 1, None)

    # S_1 = local ∪ global {2}; before = {0, 1}. First layer: S = {1, 2, 3} → e0 old, e1 shared,
    # e2 new, e3 new. Second layer: S = {0, 2, 3} → e0 shared, e1 old, e2 new, e3 new.
    by_hand = {n: [betas["old"], betas["shared"], betas["new"], betas["new"]] for n in names}
    by_hand[second] = [betas["shared"], betas["old"], betas["new"], betas["new"]]
    r = 2
    for n, m in method.layers:
        old_a, old_b = state["snapshot"][f"{n}.mode_text_A"], state["snapshot"][f"{n}.mode_text_B"]
        new_a, new_b = new[n]
        for expert, beta in enumerate(by_hand[n]):
            rows = slice(expert * r, (expert + 1) * r)
            torch.testing.assert_close(m.mode_text_A[rows], beta * old_a[rows] + (1 - beta) * new_a[rows])
            torch.testing.assert_close(m.mode_text_B[:, rows], beta * old_b[:, rows] + (1 - beta) * new_b[:, rows])
        assert torch.equal(m.mode_text_router, routers[n][0]) and torch.equal(m.mode_task_router, routers[n][1])
    after = method.state_dict()
    assert after["selected"][1][first] == [1, 2, 3] and after["selected"][1][second] == [0, 2, 3]
    assert after["betas"][1] == by_hand
    assert after["task"] == -1 and after["snapshot"] == {}
    assert method.context.task is None  # evaluation routes by the nearest key
    torch.testing.assert_close(
        layer.mode_text_A[:r], 0.9 * state["snapshot"][f"{first}.mode_text_A"][:r] + 0.1 * new[first][0][:r]
    )


def test_first_task_merges_nothing_and_starts_the_history(make_model, ids):
    method = _method(ids, clmoe_top_k_instance=1, clmoe_top_k_task=1)
    model = method.attach(make_model())
    names = [n for n, _ in method.layers]
    widths = {n: m.base_layer.in_features for n, m in method.layers}
    state = {
        "task": 0,
        "task_keys": {n: _unit(widths[n], 0)[None] for n in names},
        "instance_counts": {n: torch.tensor([0, 0, 4, 1]) for n in names},
        "snapshot": {},
        "selected": [],
        "betas": [],
    }
    method.load_state_dict(_round_trip(state))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "mode_" in n}
    method.after_task(model, 0, None)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "mode_" in n)
    chosen = {n: sorted({2} | set(m.global_experts(0))) for n, m in method.layers}
    assert method.state_dict()["selected"] == [chosen] and method.state_dict()["betas"] == [{n: [] for n in names}]


def test_betas_and_router_mix_above_one_are_rejected(ids):
    with pytest.raises(ConfigError, match=r"method\.clmoe_beta_old: must be ≤ 1"):
        _method(ids, clmoe_beta_old=1.5)
    with pytest.raises(ConfigError, match=r"method\.clmoe_router_mix"):
        _method(ids, clmoe_router_mix=2.0)


def test_resume_inside_task_2_reproduces_the_uninterrupted_run(micro_work_dir, tmp_path):
    overrides = [
        *MICRO_RUN,
        "tasks=[parity, bigsmall, prime]",
        "method.name=cl_moe",
        "method.num_experts=3",
        "method.clmoe_top_k_instance=2",
        "method.clmoe_top_k_task=1",
    ]
    config, full, checkpoints = run_then_crash(overrides, micro_work_dir, tmp_path)
    # The mid-task state holds task 2's key, its counts so far and θ^old = the model as task 1 left it.
    state = torch.load(checkpoints / "ckpt_t01_s000002" / "adapter" / "method_state.pt", weights_only=True)
    end_of_task1 = load_file(str(checkpoints / "ckpt_t01_s000000" / "adapter" / "adapter.safetensors"))
    assert state["task"] == 1 and len(state["selected"]) == 1
    assert all(keys.shape[0] == 2 for keys in state["task_keys"].values())
    assert all(int(counts.sum()) > 0 for counts in state["instance_counts"].values())
    assert state["snapshot"].keys() == {k for k in end_of_task1 if ".mode_text_A" in k or ".mode_text_B" in k}
    assert all(torch.equal(state["snapshot"][k], end_of_task1[k]) for k in state["snapshot"])

    resume_and_compare(config, micro_work_dir, tmp_path, full, ("adapter.safetensors", "method_state.pt"))
    final_state = torch.load(
        tmp_path / "full" / "checkpoints" / "ckpt_t03_s000000" / "adapter" / "method_state.pt", weights_only=True
    )
    assert len(final_state["selected"]) == 3 and all(len(b) == 3 for b in final_state["betas"][2].values())
