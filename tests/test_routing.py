"""Routing: image tokens are begin-image..end-image inclusive, also during cached decoding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from trainables.mode import MoDEConfig, attach_mode, image_token_mask, record_routing, route_as

B, E = 100, 101  # stand-in ids for begin/end-image in the pure-function tests


def test_mask_marks_spans_inclusive_and_ignores_stray_end():
    tokens = torch.tensor([[1, B, 7, 7, E, 2, E, 3, B, 9]])
    mask, inside = image_token_mask(tokens, B, E)
    assert mask.tolist() == [[False, True, True, True, True, False, False, False, True, True]]
    assert inside.tolist() == [True]  # the last span is still open


def test_mask_continues_an_open_span_from_the_cache():
    mask, inside = image_token_mask(torch.tensor([[7, 7, E, 3], [5, 6, 7, 8]]), B, E, torch.tensor([True, False]))
    assert mask.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert inside.tolist() == [False, False]


def test_chunked_masks_equal_the_full_mask_at_every_split():
    tokens = torch.tensor([[1, B, 7, 7, E, 2, B, 8, 8, 8, E, 4, B, 9]])
    full, _ = image_token_mask(tokens, B, E)
    for split in range(1, tokens.shape[1]):
        head, inside = image_token_mask(tokens[:, :split], B, E)
        tail, _ = image_token_mask(tokens[:, split:], B, E, inside)
        assert torch.equal(torch.cat([head, tail], dim=1), full), split


def _assignments(records):
    """Per adapted-layer call: (image mask, arg-max expert) concatenated over the calls of one layer."""
    per_layer: dict[int, list] = {}
    for record in records:
        per_layer.setdefault(id(record["layer"]), []).append(record)
    result = []
    for calls in per_layer.values():
        mask = torch.cat([c["image_mask"] for c in calls], dim=1)
        expert = torch.cat([c["gates"].argmax(-1) for c in calls], dim=1)
        result.append((mask, expert))
    return result


def test_cached_decoding_routes_like_the_full_sequence(make_model, seq):
    model = attach_mode(make_model(), MoDEConfig(dropout=0.0)).eval()
    # A prompt containing an image, then a continuation that opens, fills and closes a second image
    # and returns to text: every transition happens during one-token cached steps.
    prompt = [seq.ids.bos, *seq.image([1, 2, 3]), *seq.words("draw two"), seq.ids.separator]
    continuation = seq.image([4, 5, 6, 7]) + seq.words("one two") + [seq.ids.eos]
    full_tokens = torch.tensor([prompt + continuation])

    with torch.no_grad(), record_routing(model) as full_records:
        model(input_ids=full_tokens)
    with torch.no_grad(), record_routing(model) as cached_records:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
        for token in continuation:
            model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)

    full, cached = _assignments(full_records), _assignments(cached_records)
    assert len(full) == len(cached) == 6
    expected_mask = image_token_mask(full_tokens, seq.ids.begin_image, seq.ids.end_image)[0]
    assert expected_mask.sum() == 5 + 6
    for (full_mask, full_expert), (cached_mask, cached_expert) in zip(full, cached, strict=True):
        assert torch.equal(full_mask, expected_mask)
        assert torch.equal(cached_mask, full_mask)
        assert torch.equal(cached_expert, full_expert)


def test_generate_routes_generated_tokens_inside_an_open_image_span(make_model, seq):
    model = attach_mode(make_model(), MoDEConfig(dropout=0.0)).eval()
    prompt = torch.tensor(
        [[seq.ids.bos, *seq.image([1, 2]), *seq.words("draw one"), seq.ids.separator, seq.ids.begin_image]]
    )
    with torch.no_grad(), record_routing(model) as records:
        generated = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=seq.ids.pad)
    with torch.no_grad(), record_routing(model) as full_records:
        model(input_ids=generated[:, :-1])  # the last token is produced, never fed back
    cached = _assignments(records)
    full = _assignments(full_records)
    expected = image_token_mask(generated[:, :-1], seq.ids.begin_image, seq.ids.end_image)[0]
    for (cached_mask, cached_expert), (full_mask, full_expert) in zip(cached, full, strict=True):
        assert torch.equal(cached_mask, expected) and torch.equal(full_mask, expected)
        assert torch.equal(cached_expert, full_expert)
    # Tokens generated after the prompt's begin-image stay image tokens until an end-image appears.
    tail = generated[0, prompt.shape[1] : -1].tolist()
    closed = seq.ids.end_image in tail
    first_close = tail.index(seq.ids.end_image) if closed else len(tail)
    assert expected[0, prompt.shape[1] : prompt.shape[1] + first_close + 1].all()


def test_route_as_overrides_routing(make_model, seq):
    model = attach_mode(make_model(), MoDEConfig(dropout=0.0))
    tokens = torch.tensor([seq.words("what digit is this")])
    with torch.no_grad(), route_as(model, "image"), record_routing(model) as records:
        model(input_ids=tokens)
    assert all(r["image_mask"].all() for r in records)


def test_decoding_refuses_a_transformers_that_ignores_the_cache(make_model, ids, monkeypatch):
    """Transformers < 5.24 drops `cache=`; generation must stop instead of sampling from one token."""
    from trainables.benchmarks.digits.evaluate import generate_images

    model = make_model()
    forward = model.model.forward

    def without_cache(*args, cache=None, **kwargs):
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", without_cache)

    class Builder:
        def __init__(self, ids):
            self.ids = ids

        def generation_prompt(self, digit):
            return [ids.bos, ids.separator]

    with pytest.raises(RuntimeError, match="ignored `cache=`"):
        generate_images(model, Builder(ids), [0, 1], 0.0, torch.Generator().manual_seed(0))
    monkeypatch.undo()
    tokens = generate_images(model, Builder(ids), [0, 1], 0.0, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, 64)
