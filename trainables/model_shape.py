"""The decoder shape of a random-init Chameleon-style model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import ChameleonConfig, ChameleonVQVAEConfig


@dataclass(frozen=True)
class ChameleonShape:
    """Decoder shape of a random-init Chameleon: the tiny digits model, the real-layout test models and
    the benchmark models are all built from one of these (the VQ-VAE shape is chosen separately)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    max_position_embeddings: int = 4096

    def chameleon_config(self, vocabulary_map: dict[str, int], vq_config: ChameleonVQVAEConfig) -> ChameleonConfig:
        """A ``ChameleonConfig`` of this shape over ``vocabulary_map`` (ids of ``<s>``, ``<pad>``,
        ``</s>`` read from it) with the given VQ-VAE."""
        from transformers import ChameleonConfig

        return ChameleonConfig(
            vocab_size=max(vocabulary_map.values()) + 1,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            vq_config=vq_config.to_dict(),
            vocabulary_map=dict(vocabulary_map),
            bos_token_id=vocabulary_map["<s>"],
            pad_token_id=vocabulary_map["<pad>"],
            eos_token_id=vocabulary_map["</s>"],
        )
