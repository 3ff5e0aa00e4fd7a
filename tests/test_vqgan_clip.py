"""Chameleon's VQGAN decoder (taming layout, safe loading, code map), CLIP scores and the Fréchet
distance, offline on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_t2i import TINY, NotATensor, _tiny_clip_dir, _write_yaml
from trainables.benchmarks.coin.clip_scores import (
    ClipModelError,
    ClipScorer,
    fd_clip,
    gaussian_frechet,
    image_alignment,
    text_alignment,
)
from trainables.benchmarks.coin.vqgan import (
    VQGANConfig,
    VQGANDecoder,
    VQGANLoadError,
    convert_vqgan_checkpoint,
    load_vqgan_decoder,
)
from trainables.metrics import frechet_distance


def _expected_taming_keys(config: VQGANConfig) -> list[str]:
    """taming-transformers' VQModel decoder-side keys, enumerated from its Decoder's construction."""

    def pair(name):
        return [f"{name}.weight", f"{name}.bias"]

    def resnet(name, shortcut):
        keys = [k for part in ("norm1", "conv1", "norm2", "conv2") for k in pair(f"{name}.{part}")]
        return keys + (pair(f"{name}.nin_shortcut") if shortcut else [])

    def attn(name):
        return [k for part in ("norm", "q", "k", "v", "proj_out") for k in pair(f"{name}.{part}")]

    keys = ["quantize.embedding.weight", *pair("post_quant_conv"), *pair("decoder.conv_in")]
    keys += resnet("decoder.mid.block_1", False) + attn("decoder.mid.attn_1") + resnet("decoder.mid.block_2", False)
    block_in = config.ch * config.ch_mult[-1]
    res = config.resolution // 2 ** (len(config.ch_mult) - 1)
    for level in reversed(range(len(config.ch_mult))):
        block_out = config.ch * config.ch_mult[level]
        for j in range(config.num_res_blocks + 1):
            keys += resnet(f"decoder.up.{level}.block.{j}", block_in != block_out)
            block_in = block_out
            if res in config.attn_resolutions:
                keys += attn(f"decoder.up.{level}.attn.{j}")
        if level:
            keys += pair(f"decoder.up.{level}.upsample.conv")
            res *= 2
    return keys + pair("decoder.norm_out") + pair("decoder.conv_out")


def test_vqgan_keys_match_taming_for_tiny_and_chameleon_configs():
    tiny = VQGANDecoder(TINY)
    assert sorted(tiny.state_dict()) == sorted(_expected_taming_keys(TINY))
    assert any(".attn.1." in k for k in tiny.state_dict())
    with torch.device("meta"):  # Chameleon's full shape, without allocating it
        real = VQGANDecoder()
    state = real.state_dict()
    assert sorted(state) == sorted(_expected_taming_keys(VQGANConfig()))
    shapes = {
        "quantize.embedding.weight": (8192, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("decoder.up.0.upsample") or ".attn.0." in k for k in state)  # attn_resolutions []
    assert VQGANConfig().tokens_per_image == 1024


def test_vqgan_decodes_codes_to_images_in_unit_range():
    torch.manual_seed(0)
    decoder = VQGANDecoder(TINY).eval()
    codes = torch.randint(0, 8192, (3, TINY.tokens_per_image))
    images = decoder.decode(codes)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0 and images.std() > 0
    assert torch.allclose(decoder.decode(codes[:1]), images[:1], atol=1e-5)  # per-image, up to round-off
    with pytest.raises(ValueError, match="VQ indices"):
        decoder.decode(codes + 8192)
    with pytest.raises(ValueError, match="shape"):
        decoder.decode(codes[:, :5])


def test_vqgan_save_load_round_trips_and_refuses_pickled_objects(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    decoder = VQGANDecoder(TINY).eval()
    codes = torch.randint(0, 8192, (2, TINY.tokens_per_image))
    reference = decoder.decode(codes)
    # safetensors + the yaml of the same name next to it
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "vqgan.safetensors"))
    _write_yaml(tmp_path / "vqgan.yaml", TINY)
    assert VQGANConfig.from_yaml(tmp_path / "vqgan.yaml") == TINY
    assert torch.equal(load_vqgan_decoder(tmp_path / "vqgan.safetensors").decode(codes), reference)
    # A tensors-only Lightning-style checkpoint (extra encoder / loss tensors ignored) loads safely.
    extra = {"encoder.conv_in.weight": torch.zeros(2), "loss.discriminator.w": torch.ones(1)}
    torch.save({"state_dict": {**decoder.state_dict(), **extra}, "epoch": 3}, tmp_path / "vqgan.ckpt")
    assert torch.equal(load_vqgan_decoder(tmp_path / "vqgan.ckpt").decode(codes), reference)
    # A pickled non-tensor object is refused, with the conversion command in the message.
    unsafe = tmp_path / "lightning" / "vqgan.ckpt"
    unsafe.parent.mkdir()
    torch.save({"state_dict": decoder.state_dict(), "callbacks": NotATensor()}, unsafe)
    with pytest.raises(VQGANLoadError, match="convert_vqgan_checkpoint") as error:
        load_vqgan_decoder(unsafe, TINY)
    assert "\n" not in str(error.value)
    converted = convert_vqgan_checkpoint(unsafe, tmp_path / "converted" / "vqgan.safetensors")
    assert torch.equal(load_vqgan_decoder(converted, TINY).decode(codes), reference)
    # Wrong shape for the config, missing file: one-line errors.
    with pytest.raises(VQGANLoadError, match="does not match"):
        load_vqgan_decoder(converted)  # no yaml next to it → Chameleon's default shape
    with pytest.raises(VQGANLoadError, match="does not exist"):
        load_vqgan_decoder(tmp_path / "missing.ckpt")


def test_frechet_matches_hand_computed_gaussians():
    # 1-D: (μ1 − μ2)² + σ1² + σ2² − 2 σ1 σ2
    assert gaussian_frechet([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx((1 - 3) ** 2 + 4 + 9 - 2 * 2 * 3)
    # Diagonal 2-D: sum over dimensions of the 1-D formula
    got = gaussian_frechet([0.0, 1.0], np.diag([1.0, 4.0]), [1.0, 1.0], np.diag([9.0, 1.0]))
    assert got == pytest.approx((1 + 1 + 9 - 6) + (0 + 4 + 1 - 4))
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(0.5, 2.0, size=(40, 4))
    assert fd_clip(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)
    assert fd_clip(a, a) == pytest.approx(0.0, abs=1e-8)
    assert math.isnan(fd_clip(a[:1], b))


def test_alignments_are_cosines():
    images = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert text_alignment(images, texts) == pytest.approx((1 / math.sqrt(2) + 1.0) / 2)
    reference = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # image 0: (1 − 1 + 0)/3; image 1: (0 + 0 + 1)/3
    assert image_alignment(images, reference) == pytest.approx((0 + 1 / 3) / 2)


def test_clip_scorer_offline(tmp_path):
    scorer = ClipScorer(str(_tiny_clip_dir(tmp_path)))
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16)
    embeddings = scorer.image_embeddings(images)
    assert embeddings.shape == (3, 16)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    texts = scorer.text_embeddings(["photo of a cat.", "a dog", "x" * 300])  # the long one is truncated
    assert texts.shape == (3, 16)
    scores = scorer.scores(
        embeddings, ["photo of a cat.", "a dog", "x"], scorer.image_embeddings(torch.rand(4, 3, 20, 24))
    )
    assert set(scores) == {"text_align", "image_align", "fd_clip"}
    assert all(math.isfinite(v) for v in scores.values()) and -1 <= scores["text_align"] <= 1
    with pytest.raises(ClipModelError, match="clip_model"):
        ClipScorer(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- CoIN wiring
