"""MoDE adapters: exact equivalence at init, teacher mode, modality-decoupled gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_adapters
from trainables.losses import causal_lm_logits
from trainables.methods import MethodConfig, StreamBatch, build_method
from trainables.mode import MoDEConfig, attach_mode, mode_layers, route_as, teacher_mode


def _logits(model, tokens):
    return causal_lm_logits(model, torch.tensor([tokens]))


def test_attached_model_equals_base_at_init_and_teacher_equals_base_always(make_model, seq):
    tokens = seq.understanding([1, 2, 3, 4], "what digit is this", "three")
    base = make_model()
    attached = attach_mode(make_model(), MoDEConfig())
    with torch.no_grad():
        expected = _logits(base, tokens)
        attached.train()  # dropout active on the adapter path must not matter while B == 0
        assert torch.equal(_logits(attached, tokens), expected)
        attached.eval()
        assert torch.equal(
            attached(input_ids=torch.tensor([tokens])).logits, base(input_ids=torch.tensor([tokens])).logits
        )

        randomize_adapters(attached)
        assert not torch.equal(_logits(attached, tokens), expected)
        with teacher_mode(attached):
            assert torch.equal(_logits(attached, tokens), expected)
        with teacher_mode(attached), route_as(attached, "image"):
            assert torch.equal(_logits(attached, tokens), expected)


def test_attach_freezes_base_and_names_parameters_by_modality(make_model):
    model = attach_mode(make_model(), MoDEConfig(r=4, num_experts=3))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("mode_text" in n) or ("mode_image" in n) for n in trainable)
    assert len(mode_layers(model)) == 2 * 3  # 2 layers × gate/up/down
    layer = mode_layers(model)[0][1]
    assert layer.mode_text_A.shape == (3 * 4, 64) and layer.mode_text_router.shape == (3, 64)
    assert layer.mode_image_B.shape == (96, 4)


def test_attach_errors_are_clear(make_model):
    with pytest.raises(ValueError, match=r"matched no nn\.Linear"):
        attach_mode(make_model(), MoDEConfig(target_modules=("nope_proj",)))
    model = attach_mode(make_model(), MoDEConfig())
    with pytest.raises(ValueError, match="already attached"):
        attach_mode(model, MoDEConfig())
    with pytest.raises(ValueError, match=r"MoDEConfig\.r must be a positive integer"):
        MoDEConfig(r=0)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _answer_ce(model, tokens):
    input_ids = torch.tensor([tokens])
    logits = causal_lm_logits(model, input_ids)
    return torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])


def test_text_loss_leaves_image_adapter_untouched_and_image_loss_leaves_experts_untouched(make_model, seq):
    model = attach_mode(make_model(), MoDEConfig(dropout=0.0))
    randomize_adapters(model)
    grads = _grads(model, _answer_ce(model, [seq.ids.bos, *seq.words("what digit is this even odd one")]))
    image_grads = [g for n, g in grads.items() if "mode_image" in n]
    text_grads = [g for n, g in grads.items() if "mode_text" in n]
    assert image_grads and all(torch.count_nonzero(g) == 0 for g in image_grads)
    assert all(torch.count_nonzero(g) > 0 for g in text_grads)

    grads = _grads(model, _answer_ce(model, seq.image([3, 1, 4, 1, 5, 9, 2, 6])))
    assert all(torch.count_nonzero(g) == 0 for n, g in grads.items() if "mode_text" in n)
    assert all(torch.count_nonzero(g) > 0 for n, g in grads.items() if "mode_image" in n)


def test_distillation_gradient_reaches_only_the_image_adapter(make_model, ids, seq):
    model = make_model()
    method = build_method(MethodConfig(name="mode", dropout=0.0), ids)
    model = method.attach(model)
    randomize_adapters(model)
    stream = torch.tensor([seq.image([0, 1, 2, 3, 4, 5]), seq.image([6, 7, 8, 9, 10, 11])])
    kd = method.distillation(model, StreamBatch(stream, torch.ones_like(stream)))
    assert kd.item() > 0
    grads = _grads(model, kd)
    # An all-image forward runs the V-Adapter alone: the experts and router get no gradient at all.
    assert all(g is None for n, g in grads.items() if "mode_text" in n)
    assert all(g is not None and torch.count_nonzero(g) > 0 for n, g in grads.items() if "mode_image" in n)
