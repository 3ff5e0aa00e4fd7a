"""Guards for cached decoding with the transformers version we are given."""

from __future__ import annotations

import transformers
from transformers import Cache


def require_cache_filled(cache: Cache, expected_tokens: int) -> None:
    """Raise if a forward left ``cache`` without the ``expected_tokens`` it was given.

    Transformers before 5.24 names the keyword ``past_key_values`` and silently ignores ``cache=``:
    decoding would then sample every token from a one-token context and score garbage images as
    the model's (seen on a GPU machine with transformers 5.17).
    """
    held = cache.get_seq_length()
    if held != expected_tokens:
        raise RuntimeError(
            f"the KV cache holds {held} tokens after a {expected_tokens}-token prompt: transformers "
            f"{transformers.__version__} ignored `cache=`; mode-cl needs transformers>=5.24 (scripts/install.sh)"
        )
