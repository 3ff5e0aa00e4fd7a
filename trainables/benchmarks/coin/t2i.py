"""Text-to-image sampling with a KV cache, as the paper's inter-modal evaluation.

Each prompt (``<s> caption <sep>``) gets begin-image appended, then exactly ``tokens_per_image``
tokens are sampled (``do_sample``, temperature / top-k) with every logit outside the image codebook
masked, then end-image closes the span. Greedy decoding is not offered: the paper's code notes that
it gives blank images.

Determinism: each prompt draws from its own ``torch.Generator`` seeded from ``(seed, prompt
index)``, so a prompt's image does not depend on the batch it is in or on the batch size (up to
float round-off of batched matmuls, as :func:`trainables.benchmarks.coin.decoding.greedy_decode`). A caller that
samples only a share of the prompts (one rank of a sharded evaluation) passes their ``indices`` in
the full list, so each image is the one the single-process run samples.

Routing with MoDE attached: the decoder's pre-hook derives the image mask from ``input_ids`` on
every forward and carries the "inside an image span" flag across cached forwards
(:mod:`trainables.mode.routing`). The prompt forward therefore routes the caption (and padding) to
the T-MoE and the trailing begin-image to the V-Adapter, and every sampled code token — fed one at
a time with the cache — to the V-Adapter: the same routing as training. (The official code routes
the whole sequence, caption included, to the V-Adapter in T2I mode.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainables.benchmarks.coin.decoding import CachedDecoding
from trainables.losses import unwrap
from trainables.vocab import TokenIds

_SEED_STRIDE = 1_000_003  # a prime: (seed, index) pairs map to distinct generator seeds for any realistic count


def prompt_seed(seed: int, index: int) -> int:
    """Generator seed of prompt ``index`` (its position in the full prompt list)."""
    return (int(seed) * _SEED_STRIDE + int(index)) % (2**63 - 1)


def _sample(
    logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_k: int | None
) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (already masked), row ``i`` drawn with ``generators[i]``."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.cat(
        [torch.multinomial(probs[row], 1, generator=generator) for row, generator in enumerate(generators)]
    )


@torch.no_grad()
def sample_image_tokens(
    model: nn.Module,
    prompts: list[list[int]],
    ids: TokenIds,
    tokens_per_image: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 42,
    batch_size: int = 8,
    indices: Sequence[int] | None = None,
) -> list[list[int]]:
    """Sample one image per prompt: returns ``[begin-image, code BPE id × tokens_per_image, end-image]``
    for each prompt (BPE ids of the language model; map them to VQ indices with
    :class:`trainables.benchmarks.coin.vqgan.ImageCodeMap`). Prompts are left-padded with explicit positions.
    ``indices``: each prompt's index in the full prompt list, which seeds its generator (default:
    its position in ``prompts``)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (sampling; greedy gives blank images), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if tokens_per_image <= 0:
        raise ValueError(f"tokens_per_image must be positive, got {tokens_per_image}")
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    lm = unwrap(model)
    device = next(model.parameters()).device
    blocked = ~ids.codebook_mask(device)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = [[*prompt, ids.begin_image] for prompt in prompts[start : start + batch_size]]
        generators = [
            torch.Generator(device=device).manual_seed(prompt_seed(seed, index))
            for index in indices[start : start + batch_size]
        ]
        decoding = CachedDecoding(lm, batch, ids.pad, device)
        sampled: list[torch.Tensor] = []
        for step in range(tokens_per_image):
            token = _sample(decoding.next_logits(blocked), generators, temperature, top_k)
            sampled.append(token)
            if step == tokens_per_image - 1:
                break  # end-image is appended, not fed: nothing is sampled after it
            decoding.feed(token)
        codes = torch.stack(sampled, dim=1).tolist()
        results.extend([ids.begin_image, *row, ids.end_image] for row in codes)
    return results


def span_codes(spans: list[list[int]], ids: TokenIds, tokens_per_image: int) -> list[list[int]]:
    """The ``tokens_per_image`` code ids inside each ``[begin-image … end-image]`` span (BPE ids)."""
    out = []
    for index, span in enumerate(spans):
        if span[:1] == [ids.begin_image]:
            span = span[1:]
        if span[-1:] == [ids.end_image]:
            span = span[:-1]
        if len(span) != tokens_per_image:
            raise ValueError(f"image span {index} has {len(span)} codes, expected {tokens_per_image}")
        out.append(list(span))
    return out
