"""save_mode / load_mode (and the seq_lora equivalent): bit-exact round trips, strict mismatches."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import randomize_adapters
from trainables.adapter_io import AdapterMismatchError
from trainables.losses import causal_lm_logits
from trainables.methods import MethodConfig, build_method
from trainables.mode import MoDEConfig, attach_mode, load_mode, save_mode


def test_round_trip_reproduces_logits_bit_exactly(make_model, seq, tmp_path):
    tokens = torch.tensor([seq.understanding([1, 2, 3], "what digit is this", "two")])
    trained = attach_mode(make_model(), MoDEConfig()).eval()
    randomize_adapters(trained)
    save_mode(trained, tmp_path / "adapter")
    restored = load_mode(attach_mode(make_model(), MoDEConfig()).eval(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(causal_lm_logits(restored, tokens), causal_lm_logits(trained, tokens))
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]


@pytest.mark.parametrize(
    ("saved", "loaded", "field"),
    [
        (MoDEConfig(r=8), MoDEConfig(r=4), "r"),
        (MoDEConfig(num_experts=4), MoDEConfig(num_experts=2), "num_experts"),
        (MoDEConfig(), MoDEConfig(image_adapter=False), "image_adapter"),
    ],
)
def test_mismatched_config_is_refused_before_any_tensor_changes(make_model, tmp_path, saved, loaded, field):
    source = attach_mode(make_model(), saved)
    randomize_adapters(source)
    save_mode(source, tmp_path)
    target = attach_mode(make_model(), loaded)
    before = {n: p.clone() for n, p in target.named_parameters() if p.requires_grad}
    with pytest.raises(AdapterMismatchError, match=field):
        load_mode(target, tmp_path)
    assert all(torch.equal(before[n], p) for n, p in target.named_parameters() if p.requires_grad)


def test_tampered_shapes_are_refused(make_model, tmp_path):
    from safetensors.torch import load_file, save_file

    model = attach_mode(make_model(), MoDEConfig())
    save_mode(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("mode_text_A"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(AdapterMismatchError, match="shapes do not match"):
        load_mode(attach_mode(make_model(), MoDEConfig()), tmp_path)
    del tensors[key]
    save_file(tensors, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(AdapterMismatchError, match="1 missing"):
        load_mode(attach_mode(make_model(), MoDEConfig()), tmp_path)


def test_missing_adapter_directory_is_a_clear_error(make_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter in"):
        load_mode(attach_mode(make_model(), MoDEConfig()), tmp_path / "absent")


def test_seq_lora_round_trip_and_rank_mismatch(make_model, ids, seq, tmp_path):
    tokens = torch.tensor([seq.understanding([1, 2], "what digit is this", "one")])
    method = build_method(MethodConfig(name="seq_lora", r=4, num_experts=2), ids)
    trained = method.attach(make_model()).eval()
    randomize_adapters(trained)
    method.save(trained, tmp_path)
    restored = method.load(method.attach(make_model()).eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(causal_lm_logits(restored, tokens), causal_lm_logits(trained, tokens))
    other = build_method(MethodConfig(name="seq_lora", lora_r=2), ids)
    with pytest.raises(AdapterMismatchError, match=f"r: stored {method.rank} vs model 2"):
        other.load(other.attach(make_model()), tmp_path)


def test_base_model_loads_without_hub_kernels(make_model, tmp_path):
    """Loading must not swap in layer kernels from the Hub (transformers ≥ 5.25 does by default on
    CUDA): runs stay offline and their numerics are the ones we test."""
    from trainables.benchmarks.digits.base_model import load_base

    make_model().save_pretrained(tmp_path)
    assert load_base(tmp_path).use_kernels is False
