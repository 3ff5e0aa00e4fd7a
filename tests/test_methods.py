"""Every method attaches, trains a few steps on a toy batch and lowers its loss."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import MICRO_RUN, crashed_copy
from trainables.config import load_run_config
from trainables.engine import run_sequence
from trainables.methods import METHODS, Batch, MethodConfig, StreamBatch, build_method


def _pad(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, (ids != pad).long()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_and_its_loss_goes_down(name, make_model, ids, seq):
    torch.manual_seed(0)
    method = build_method(MethodConfig(name=name, r=4, num_experts=2, dropout=0.0), ids)
    model = method.attach(make_model()).train()
    rows = [
        seq.understanding([1, 2, 3], "what digit is this", "three"),
        seq.understanding([4, 5], "what digit is this", "one"),
        seq.generation("draw two", [6, 7, 8, 9]),
    ]
    input_ids, attention = _pad(rows, ids.pad)
    batch = Batch(input_ids, attention, torch.tensor([False, False, True]))
    stream_ids = torch.tensor([seq.image([0, 1, 2, 3, 4]), seq.image([5, 6, 7, 8, 9])])
    stream = StreamBatch(stream_ids, torch.ones_like(stream_ids))
    params = list(method.trainable_parameters(model))
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(20):
        terms = method.loss_terms(model, batch, stream=stream)
        assert ("kd" in terms) == (name == "mode")
        loss = sum(terms.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(terms["task"].item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_unknown_method_suggests_the_closest_name(ids):
    with pytest.raises(ValueError, match="did you mean 'moelora'"):
        build_method("moelor", ids)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kd_weight": -0.1}, "kd_weight"), ({"kd_weight": float("nan")}, "kd_weight"), ({"r": 0}, "r: must be > 0")],
)
def test_bad_hyper_parameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)


@pytest.mark.parametrize(("r", "experts"), [(8, 4), (4, 2), (2, 4)])
def test_seq_lora_default_rank_matches_mode_trainable_parameters_within_5_percent(make_model, ids, r, experts):
    counts = {}
    for name in ("mode", "seq_lora"):
        method = build_method(MethodConfig(name=name, r=r, num_experts=experts), ids)
        model = method.attach(make_model())
        counts[name] = sum(p.numel() for p in method.trainable_parameters(model))
    assert abs(counts["seq_lora"] / counts["mode"] - 1) <= 0.05, counts
    # an explicit lora_r is taken as it is
    method = build_method(MethodConfig(name="seq_lora", r=r, num_experts=experts, lora_r=3), ids)
    method.attach(make_model())
    assert method.rank == 3


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_resumes_inside_a_task_bit_for_bit(name, micro_work_dir, tmp_path):
    """Every method, killed two steps into its second task and resumed from that checkpoint, ends
    with the uninterrupted run's results and adapter bytes (method state included)."""
    overrides = [*MICRO_RUN, f"method.name={name}", "checkpoint.every_steps=1", "checkpoint.num_to_keep=0"]
    config = load_run_config(None, overrides)
    full = run_sequence(config, micro_work_dir, tmp_path / "full", log=lambda _: None)
    crashed_copy(tmp_path / "full", tmp_path / "crashed", "ckpt_t01_s000002")
    messages: list[str] = []
    resumed = run_sequence(config, micro_work_dir, tmp_path / "crashed", log=messages.append)
    assert any("resuming from checkpoint ckpt_t01_s000002: task 2, step 2" in m for m in messages)
    for key in ("acc_matrix", "open_acc_matrix", "losses", "gen_acc", "gen_fd", "gen_nll"):
        assert resumed[key] == full[key], key
    final = "checkpoints/ckpt_t02_s000000/adapter"
    for file in sorted((tmp_path / "full" / final).iterdir()):
        assert (tmp_path / "crashed" / final / file.name).read_bytes() == file.read_bytes(), file.name


def test_baseline_settings_enter_the_config_hash_only_when_changed():
    default = load_run_config(None, []).config_hash()
    assert load_run_config(None, ["method.replay_per_task=40", "method.clmoe_beta_old=0.7"]).config_hash() == default
    assert load_run_config(None, ["method.replay_per_task=3"]).config_hash() != default
    assert load_run_config(None, ["method.lwf_weight=2"]).config_hash() != default
    assert "replay_per_task" not in load_run_config(None, []).to_dict()["method"]


def test_the_ray_train_matrix_covers_every_method_family():
    """A method runs under DDP in tests/test_ray_train.py itself or shares a class below ``Method``
    with one that does; a method of a new family must join that matrix."""
    from tests.test_ray_train import DDP_METHODS
    from trainables.methods import Method

    def families(cls):
        return {c for c in cls.__mro__ if issubclass(c, Method) and c is not Method}

    covered = set().union(*(families(METHODS[name]) for name in DDP_METHODS))
    for name, cls in METHODS.items():
        assert families(cls) & covered, f"{name}: add it to tests/test_ray_train.py DDP_METHODS"


def test_seq_lora_matched_rank_is_capped_at_the_narrowest_layer(make_model, ids):
    from trainables.methods.seq_lora import mode_matched_rank

    config = MethodConfig(name="seq_lora", r=8, num_experts=4)
    assert mode_matched_rank(config, [(128, 344), (128, 344), (344, 128)]) == 42
    # (E+1)·r = 40 plus the router's share would be 42 on these widths, above the narrowest (32)
    assert mode_matched_rank(config, [(32, 64), (32, 64), (64, 32)]) == 32
    load_run_config(None, [*MICRO_RUN, "method=seq_lora"])  # defaults r 8 × 4 experts on a 32-wide model: fine
