"""The decoder shape of a random-init Chameleon-style model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChameleonShape:
    """Decoder shape of a random-init Chameleon: the tiny digits model, the real-layout test models and
    the benchmark models are all built from one of these (the VQ-VAE shape is chosen separately)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 4096
