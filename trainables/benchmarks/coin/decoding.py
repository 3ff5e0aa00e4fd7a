"""Token-by-token decoding with a KV cache: greedy text answers and the loop text-to-image
sampling shares (:mod:`trainables.benchmarks.coin.t2i`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from trainables.benchmarks.coin.sharding import model_device
from trainables.decoding import require_cache_filled
from trainables.losses import unwrap
from trainables.vocab import TokenIds


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad so every prompt ends at the last column: (input_ids, attention_mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids, mask


class CachedDecoding:
    """Token-by-token continuation of a batch of prompts with a KV cache. Prompts are left-padded
    with explicit positions, so a prompt continues the same in any batch. Used by greedy answers
    here and by text-to-image sampling (:mod:`trainables.benchmarks.coin.t2i`)."""

    def __init__(self, lm: nn.Module, prompts: list[list[int]], pad_id: int, device: torch.device) -> None:
        input_ids, self.mask = (t.to(device) for t in left_pad(prompts, pad_id))
        positions = (self.mask.cumsum(1) - 1).clamp_min(0)
        self.lm, self.cache, self.rows = lm, DynamicCache(config=lm.config), input_ids.shape[0]
        self.hidden = lm.model(
            input_ids=input_ids, attention_mask=self.mask, position_ids=positions, cache=self.cache, use_cache=True
        ).last_hidden_state
        require_cache_filled(self.cache, input_ids.shape[1])
        self.next_position = positions[:, -1:] + 1

    def next_logits(self, blocked: torch.Tensor) -> torch.Tensor:
        """fp32 logits of each row's next token, ``blocked`` ids at the lowest value. The LM head is
        called directly: HF Chameleon's forward would mask the image codebook on its own."""
        logits = self.lm.lm_head(self.hidden[:, -1]).float()
        return logits.masked_fill(blocked, torch.finfo(torch.float32).min)

    def feed(self, token: torch.Tensor) -> None:
        """Append one token per row (``[rows]``) and advance the cache."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.hidden = self.lm.model(
            input_ids=token[:, None],
            attention_mask=self.mask,
            position_ids=self.next_position,
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state
        self.next_position = self.next_position + 1


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: list[list[int]], ids: TokenIds, max_new_tokens: int, batch_size: int = 8
) -> list[list[int]]:
    """Greedy continuation of each prompt over the text vocabulary, with a KV cache, until
    end-of-sequence (not included) or ``max_new_tokens``. Prompts are left-padded with explicit
    positions, so a prompt decodes the same in any batch."""
    lm = unwrap(model)
    device = model_device(model)
    blocked = ids.codebook_mask(device)
    results: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        decoding = CachedDecoding(lm, prompts[start : start + batch_size], ids.pad, device)
        finished = torch.zeros(decoding.rows, dtype=torch.bool, device=device)
        outputs: list[list[int]] = [[] for _ in range(decoding.rows)]
        for _ in range(max_new_tokens):
            logits = decoding.next_logits(blocked)
            token = torch.where(finished, torch.full_like(finished, ids.pad, dtype=torch.long), logits.argmax(-1))
            finished = finished | (token == ids.eos)
            for row, value in enumerate(token.tolist()):
                if value != ids.eos and not (value == ids.pad and finished[row]):
                    outputs[row].append(value)
            if bool(finished.all()):
                break
            decoding.feed(token)
        results.extend(outputs)
    return results
