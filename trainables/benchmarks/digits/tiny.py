"""A tiny, random-init ``ChameleonForConditionalGeneration`` built from a config (no downloads).

Its vocabulary follows Chameleon's conventions (``IMGIMG*`` codebook names, ``<racm3:break>`` /
``<eoss>`` around images) so that every id the rest of the code uses is read from
``config.vocabulary_map``, exactly as with the real 7B checkpoint.
"""

from __future__ import annotations

import torch
from transformers import ChameleonForConditionalGeneration, ChameleonVQVAEConfig

from trainables.model_shape import ChameleonShape
from trainables.vocab import SPECIAL_TOKENS, make_vocabulary_map

__all__ = ["SPECIAL_TOKENS", "TINY_SHAPE", "ChameleonShape", "build_tiny_chameleon", "make_vocabulary_map"]


# The digits benchmark's default base model (≈1 M parameters): 80-token sequences at most.
TINY_SHAPE = ChameleonShape(
    hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256
)


# The VQ-VAE is never used (images are tokenised by the benchmark's own tokenizer), but
# ChameleonModel always builds one: keep it minimal (channels must be multiples of 32).
_TINY_VQ = ChameleonVQVAEConfig(
    embed_dim=32,
    num_embeddings=64,
    latent_channels=32,
    resolution=32,
    base_channels=32,
    channel_multiplier=[1, 1],
    num_res_blocks=1,
    attn_resolutions=[],
)


def build_tiny_chameleon(
    vocabulary_map: dict[str, int], shape: ChameleonShape = TINY_SHAPE, seed: int = 0
) -> ChameleonForConditionalGeneration:
    """Random-init tiny Chameleon with ``vocabulary_map``; deterministic for a given ``seed``."""
    config = shape.chameleon_config(vocabulary_map, _TINY_VQ)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config)
    return model.eval()
