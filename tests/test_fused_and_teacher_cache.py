"""Performance work must not change the science: the fused MoDE layer equals the official-style
per-expert computation, and distillation from the teacher cache equals the live teacher."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from tests.conftest import randomize_adapters
from trainables.batching import SampleSet
from trainables.losses import causal_lm_logits, unwrap
from trainables.methods import MethodConfig, build_method
from trainables.mode import image_token_mask, mode_layers, route_as
from trainables.mode.layer import InputDropout, MoDELinear
from trainables.mode.reference import loop_image_mask, official_style
from trainables.teacher_cache import TeacherCache, load_or_build, model_fingerprint


def _mixed_batch(seq) -> torch.Tensor:
    rows = [
        seq.understanding([1, 2, 3, 4], "what digit is this", "three"),
        seq.generation("draw three", [5, 6, 7, 8, 9, 10]),
        seq.understanding([0, 15, 14, 13], "is this even", "odd"),
    ]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [seq.ids.pad] * (width - len(r)) for r in rows])


@pytest.fixture
def fused_only(monkeypatch):
    """Mixed batches through the fused product of all blocks, as on an accelerator, not through
    the per-modality rows the CPU takes."""
    monkeypatch.setattr(MoDELinear, "_split_ready", lambda self, x: False)


@pytest.mark.parametrize("path", ["cpu rows", "fused"])
@pytest.mark.parametrize("name", ["mode", "tmoe_only", "moelora"])
def test_fused_layer_matches_the_official_per_expert_computation(make_model, ids, seq, name, path, request):
    if path == "fused":
        request.getfixturevalue("fused_only")
    method = build_method(MethodConfig(name=name, r=4, num_experts=3, dropout=0.0), ids)
    model = _attached(method, make_model)
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)

    def outputs_and_grads():
        model.zero_grad()
        logits = causal_lm_logits(model, tokens)
        (logits.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    fused, fused_grads = outputs_and_grads()
    with official_style(model):
        reference, reference_grads = outputs_and_grads()
    assert not torch.equal(fused, causal_lm_logits(make_model(), tokens).detach())  # adapters matter
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == reference_grads.keys() and fused_grads
    for parameter in fused_grads:
        torch.testing.assert_close(fused_grads[parameter], reference_grads[parameter], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mode", "tmoe_only"])
def test_inference_path_equals_the_training_forward(make_model, ids, seq, name):
    """Without autograd, an eval-mode MoDE layer merges the V-Adapter into the base weight and runs
    the experts on text rows only: the same logits as the fused forward, within float rounding, on a
    padded mixed batch, on an all-image batch and while decoding from a KV cache."""
    method = build_method(MethodConfig(name=name, r=4, num_experts=3, dropout=0.1), ids)
    model = _attached(method, make_model).eval()
    randomize_adapters(model, scale=0.1)
    layers = [layer for _, layer in mode_layers(model)]
    tokens = _mixed_batch(seq)
    image_only = torch.tensor([seq.image([0, 1, 2, 3, 4, 5]), seq.image([6, 7, 8, 9, 10, 11])])
    for batch in (tokens, image_only):
        with torch.enable_grad():
            fused = causal_lm_logits(model, batch)
        assert not any(layer._inference_ready(torch.zeros(1)) for layer in layers)  # autograd on
        with torch.no_grad():
            assert all(layer._inference_ready(torch.zeros(1)) for layer in layers)
            inferred = causal_lm_logits(model, batch)
        if batch is tokens or name == "mode":  # tmoe_only leaves image tokens to the base
            assert not torch.equal(fused, causal_lm_logits(make_model(), batch).detach())  # adapters matter
        torch.testing.assert_close(inferred, fused.detach(), rtol=1e-5, atol=1e-5)
    # Decoding: a text prompt, then image tokens one at a time from the KV cache.
    prompt = torch.tensor([seq.generation("draw three", [])[:-1], seq.generation("draw one", [])[:-1]])
    with torch.enable_grad():
        fused = _greedy_image_logits(model, prompt, seq.ids)
    with torch.no_grad():
        inferred = _greedy_image_logits(model, prompt, seq.ids)
    torch.testing.assert_close(inferred, fused.detach(), rtol=1e-5, atol=1e-5)


def _greedy_image_logits(model, prompt: torch.Tensor, ids, steps: int = 5) -> torch.Tensor:
    """Logits of ``steps`` greedy decoding steps after ``prompt`` + begin-image, with a KV cache."""
    lm = unwrap(model)
    cache = DynamicCache(config=lm.config)
    codes = torch.tensor(ids.image_codes)
    begin = torch.full((prompt.shape[0], 1), ids.begin_image)
    hidden = lm.model(input_ids=torch.cat([prompt, begin], 1), cache=cache, use_cache=True).last_hidden_state
    logits = []
    for _ in range(steps):
        logits.append(lm.lm_head(hidden[:, -1]))
        token = codes[logits[-1][:, codes].argmax(-1)]
        hidden = lm.model(input_ids=token[:, None], cache=cache, use_cache=True).last_hidden_state
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("dropout", ["InputDropout", "nn.Dropout"])
@pytest.mark.parametrize("name", ["mode", "tmoe_only"])
def test_per_modality_rows_equal_the_fused_product_with_the_same_dropout_masks(
    make_model, ids, seq, name, dropout, monkeypatch
):
    """On CPU a mixed batch runs the V-Adapter on every row and the experts on the text rows
    alone; with the same seed it draws the same dropout masks as the fused product and gives the
    same output and gradients, within float rounding. Also with the layers' dropout replaced by
    ``nn.Dropout`` (step_time.py's comparison), whose mask the layer cannot read."""
    method = build_method(MethodConfig(name=name, r=4, num_experts=3, dropout=0.3), ids)
    model = _attached(method, make_model).train()
    if dropout == "nn.Dropout":
        for _, layer in mode_layers(model):
            layer.dropout = torch.nn.Dropout(0.3)
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)
    taken = []
    split = MoDELinear._split

    def spy(self, *args):
        taken.append(self)
        return split(self, *args)

    monkeypatch.setattr(MoDELinear, "_split", spy)

    def outputs_and_grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        logits = causal_lm_logits(model, tokens)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    rows, rows_grads = outputs_and_grads()
    assert len(taken) == len(mode_layers(model))
    monkeypatch.setattr(MoDELinear, "_split_ready", lambda self, x: False)
    fused, fused_grads = outputs_and_grads()
    assert len(taken) == len(mode_layers(model))  # the fused product this time
    torch.testing.assert_close(rows, fused, rtol=1e-5, atol=1e-6)
    assert rows_grads.keys() == fused_grads.keys()
    for parameter, grad in fused_grads.items():
        if grad is None:  # tmoe_only: nothing on image tokens
            assert rows_grads[parameter] is None
        else:
            torch.testing.assert_close(rows_grads[parameter], grad, rtol=1e-4, atol=1e-6, msg=parameter)


@pytest.mark.parametrize(
    "register",
    [
        lambda base, seen: base.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(1)),
        lambda base, seen: base.register_full_backward_pre_hook(lambda module, grad_out: seen.append(1)),
    ],
    ids=["full_backward_hook", "full_backward_pre_hook"],
)
def test_a_hooked_base_layer_is_not_written_in_place(make_model, ids, seq, register):
    """A full backward hook or backward pre-hook wraps the base output in a view that refuses
    in-place writes: the layer then adds its adapter product out of place, with the same result."""
    method = build_method(MethodConfig(name="mode", r=4, num_experts=3, dropout=0.0), ids)
    model = _attached(method, make_model).train()
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        causal_lm_logits(model, tokens).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = loss_and_grads()
    _, layer = mode_layers(model)[-1]  # its input depends on earlier adapters: the hook fires
    assert layer._owns_output
    seen = []
    handle = register(layer.base_layer, seen)
    try:
        assert not layer._owns_output
        hooked = loss_and_grads()
    finally:
        handle.remove()
    assert seen
    for name, grad in plain.items():
        torch.testing.assert_close(hooked[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_text_rows_follow_a_route_as_mask_edited_in_place(make_model, ids, seq):
    method = build_method(MethodConfig(name="mode", r=4, num_experts=3, dropout=0.0), ids)
    model = _attached(method, make_model).train()
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    with route_as(model, mask):
        causal_lm_logits(model, tokens)
    mask[:, ::2] = True  # the same object, edited
    with route_as(model, mask):
        edited = causal_lm_logits(model, tokens)
    with route_as(model, mask.clone()):
        fresh = causal_lm_logits(model, tokens)
    torch.testing.assert_close(edited, fresh, rtol=0, atol=0)


def test_a_forward_under_inference_mode_equals_one_under_no_grad(make_model, ids, seq):
    """Masks made under ``torch.inference_mode`` keep no version counter, and may be used after it
    (a ``route_as`` mask); the text rows are then computed without the cache."""
    method = build_method(MethodConfig(name="mode", r=4, num_experts=3, dropout=0.0), ids)
    model = _attached(method, make_model).eval()
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)
    with torch.no_grad():
        expected = causal_lm_logits(model, tokens)
    with torch.inference_mode():
        assert torch.equal(causal_lm_logits(model, tokens), expected)
        mask = torch.zeros(tokens.shape, dtype=torch.bool)
        mask[:, ::2] = True
    with torch.no_grad(), route_as(model, mask):
        routed = causal_lm_logits(model, tokens)
    with torch.no_grad(), route_as(model, mask.clone()):
        torch.testing.assert_close(routed, causal_lm_logits(model, tokens), rtol=0, atol=0)


def test_inference_path_is_not_taken_for_experts_on_image_tokens_or_in_training(make_model, ids):
    moelora = _attached(build_method(MethodConfig(name="moelora", r=4, num_experts=3), ids), make_model).eval()
    mode = _attached(build_method(MethodConfig(name="mode", r=4, num_experts=3), ids), make_model).train()
    with torch.no_grad():
        assert not any(layer._inference_ready(torch.zeros(1)) for _, layer in mode_layers(moelora))
        assert not any(layer._inference_ready(torch.zeros(1)) for _, layer in mode_layers(mode))  # dropout on


def test_all_image_forward_runs_the_image_adapter_alone_with_the_fused_result(make_model, ids, seq, fused_only):
    """``route_as(model, "image")`` (the distillation stream) skips the experts and the router; the
    loss, the V-Adapter's gradient and the dropout masks equal those of the fused product with an
    explicit all-image mask, and the experts get no gradient."""
    method = build_method(MethodConfig(name="mode", r=4, num_experts=3, dropout=0.2), ids)
    model = _attached(method, make_model).train()
    randomize_adapters(model, scale=0.1)
    stream = torch.tensor([seq.image([0, 1, 2, 3, 4, 5]), seq.image([6, 7, 8, 9, 10, 11])])

    def loss_and_grads(route):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        with route_as(model, route):
            loss = causal_lm_logits(model, stream).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    alone, alone_grads = loss_and_grads("image")
    fused, fused_grads = loss_and_grads(torch.ones(stream.shape, dtype=torch.bool))
    torch.testing.assert_close(alone, fused, rtol=1e-6, atol=1e-7)
    for name, grad in fused_grads.items():
        if "mode_image" in name:
            torch.testing.assert_close(alone_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert alone_grads[name] is None and torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("name", ["seq_lora", "lwf", "replay"])
def test_lora_evaluation_merges_the_adapter_and_puts_the_base_back_bit_for_bit(make_model, ids, seq, name):
    """peft LoRA methods evaluate with the adapter merged into the frozen weights: the same logits
    within float rounding, and afterwards every weight exactly as before (an unmerge alone rounds)."""
    method = build_method(MethodConfig(name=name, r=4, num_experts=3), ids)
    model = method.attach(make_model())
    randomize_adapters(model, scale=0.1)
    tokens = _mixed_batch(seq)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        unmerged = causal_lm_logits(model, tokens)
        with method.evaluation(model):
            assert all(layer.merged for layer in _lora_layers(model))
            merged = causal_lm_logits(model, tokens)
        again = causal_lm_logits(model, tokens)
    assert not any(layer.merged for layer in _lora_layers(model))
    assert not torch.equal(merged, unmerged)  # a merged forward really ran
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, unmerged)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_lora_evaluation_puts_the_weights_back_when_the_evaluation_fails(make_model, ids):
    method = build_method(MethodConfig(name="seq_lora", r=4, num_experts=3), ids)
    model = method.attach(make_model())
    randomize_adapters(model, scale=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="evaluation failed"), method.evaluation(model):
        assert all(layer.merged for layer in _lora_layers(model))
        raise RuntimeError("evaluation failed")
    assert not any(layer.merged for layer in _lora_layers(model))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", ["bf16 base", "output head targeted"])
def test_lora_evaluation_merges_nothing_where_merging_would_change_the_result(make_model, ids, case):
    """A bf16 weight would round the adapter away; the output head may be read directly by a
    benchmark (and may be tied to the input embeddings)."""
    targets = ("gate_proj", "up_proj", "down_proj") + (("lm_head",) if case == "output head targeted" else ())
    method = build_method(MethodConfig(name="seq_lora", r=4, num_experts=3, target_modules=targets), ids)
    model = method.attach(make_model())
    if case == "bf16 base":
        model = model.to(torch.bfloat16)
    else:
        assert any(name.endswith("lm_head") for name, m in model.named_modules() if m in _lora_layers(model))
    with method.evaluation(model):
        assert not any(layer.merged for layer in _lora_layers(model))


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


@pytest.mark.parametrize("p", [0.2, 0.05, 0.5])
def test_input_dropout_keeps_each_element_with_probability_1_minus_p_and_rescales(p):
    torch.manual_seed(0)
    dropout = InputDropout(p).train()
    p_grid = round(p * 65536) / 65536  # p on the 2⁻¹⁶ grid
    assert abs(p_grid - p) <= 2**-17
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 6 * sigma  # 1e6 draws
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p_grid)))  # mean exactly preserved
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes kept elements with the same scale
    torch.manual_seed(0)
    assert torch.equal(dropout(x), y)  # the global seed fixes the mask
    assert dropout.eval()(x) is x


def test_input_dropout_masks_are_independent_across_elements_and_layouts():
    """The four 16-bit draws from one 64-bit integer, and a size that uses only part of the last
    one: each position of a 4-element group drops at the same rate, neighbours independently."""
    torch.manual_seed(1)
    dropout = InputDropout(0.5).train()
    dropped = dropout(torch.ones(250_000, 4)) == 0  # row i: the four 16-bit parts of draw i
    rate = dropped.float().mean(0)
    assert torch.all((rate - 0.5).abs() < 6 * (0.25 / dropped.shape[0]) ** 0.5)
    both = (dropped[:, 0] & dropped[:, 1]).float().mean()  # independent: 0.25
    assert abs(both.item() - 0.25) < 6 * (0.25 * 0.75 / dropped.shape[0]) ** 0.5
    odd = dropout(torch.ones(333_335, 3)) == 0  # 1,000,005 elements: the last draw is cut
    assert abs(odd.float().mean().item() - 0.5) < 6 * (0.25 / odd.numel()) ** 0.5
    assert dropout(torch.ones(2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize(("p", "dropped"), [(1e-9, 1), (0.05, 3277), (1 - 1e-9, 65535)])
def test_input_dropout_keeps_p_off_the_grid_ends(p, dropped):
    """p′ stays within [2⁻¹⁶, 1 − 2⁻¹⁶] for 0 < p < 1: never no dropout, never a division by 0."""
    dropout = InputDropout(p)
    assert dropout.dropped_of_65536 == dropped
    assert dropout.scale == 65536 / (65536 - dropped)


def test_loop_mask_equals_vectorised_mask_with_and_without_an_open_span():
    generator = torch.Generator().manual_seed(0)
    begin, end = 7, 8
    tokens = torch.randint(0, 10, (16, 40), generator=generator)  # many begins/ends, stray ends included
    for carry in (None, torch.rand(16, generator=generator) > 0.5):
        vector_mask, vector_open = image_token_mask(tokens, begin, end, carry)
        loop_mask, loop_open = loop_image_mask(tokens, begin, end, carry)
        assert torch.equal(vector_mask, loop_mask) and torch.equal(vector_open, loop_open)


def _stream(seq) -> SampleSet:
    generator = torch.Generator().manual_seed(3)
    spans = [seq.image(torch.randint(0, 16, (n,), generator=generator).tolist()) for n in (6, 6, 9, 4, 6)]
    return SampleSet(spans, [True] * len(spans), seq.ids.pad)


def _attached(method, make_model, seed=0):
    """(attached model, fingerprint of its base model taken before attaching, as the engine does)."""
    base = make_model(seed)
    fingerprint = model_fingerprint(base)
    model = method.attach(base)
    model.base_fingerprint = fingerprint
    return model


def _build(tmp_path, method, model, stream, top_k, log=lambda _: None, calls=None):
    def teacher(ids_, mask):
        if calls is not None:
            calls.append(ids_.shape)
        return method.teacher_logits(model, ids_, mask)

    image_vocab = int(method.token_ids.image_vocab_mask().sum())
    return load_or_build(
        tmp_path, model.base_fingerprint, stream, image_vocab, top_k, teacher, torch.device("cpu"), log
    )


@pytest.mark.parametrize("top_k", [None, 5])
def test_cached_teacher_kd_equals_live_teacher_kd_loss_and_gradients(make_model, ids, seq, tmp_path, top_k):
    method = build_method(MethodConfig(name="mode", dropout=0.0, kd_top_k=top_k), ids)
    model = _attached(method, make_model)
    randomize_adapters(model)
    stream = _stream(seq)
    cache = _build(tmp_path, method, model, stream, top_k)
    picks = [2, 0, 3, 3]  # mixed lengths → right padding, a repeated sample

    def kd_and_grads(batch):
        model.zero_grad()
        kd = method.distillation(model, batch)
        kd.backward()
        return kd.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    live = stream.stream_batch_of(picks)
    cached = stream.stream_batch_of(picks)
    cached.teacher_logits, cached.teacher_index = cache.batch(picks, live.input_ids.shape[1])
    assert (cached.teacher_index is None) == (top_k is None)
    live_kd, live_grads = kd_and_grads(live)
    cached_kd, cached_grads = kd_and_grads(cached)
    assert live_kd.item() > 0
    torch.testing.assert_close(cached_kd, live_kd, rtol=1e-5, atol=1e-7)
    for name in live_grads:
        torch.testing.assert_close(cached_grads[name], live_grads[name], rtol=1e-4, atol=1e-8)


def test_teacher_cache_is_computed_once_and_keyed_by_base_stream_and_k(make_model, ids, seq, tmp_path):
    method = build_method(MethodConfig(name="mode"), ids)
    model = _attached(method, make_model)
    stream = _stream(seq)
    calls: list = []
    first = _build(tmp_path, method, model, stream, None, calls=calls)
    assert calls
    calls.clear()
    randomize_adapters(model)  # adapters are not the teacher: same key, nothing recomputed
    second = _build(tmp_path, method, model, stream, None, calls=calls)
    assert not calls and second.key == first.key and torch.equal(second.logits, first.logits)
    assert _build(tmp_path, method, model, stream, 3).key != first.key
    shorter = SampleSet(stream.sequences[:-1], [True] * 4, seq.ids.pad)
    assert _build(tmp_path, method, model, shorter, None).key != first.key
    other_base = _attached(method, make_model, seed=1)
    assert _build(tmp_path, method, other_base, stream, None).key != first.key
    meta = json.loads((tmp_path / first.key / "meta.json").read_text())
    assert meta["samples"] == 5 and meta["k"] == int(ids.image_vocab_mask().sum()) and meta["top_k"] is None


def test_a_damaged_teacher_cache_is_rebuilt_with_a_warning(make_model, ids, seq, tmp_path):
    method = build_method(MethodConfig(name="mode"), ids)
    model = _attached(method, make_model)
    stream = _stream(seq)
    good = _build(tmp_path, method, model, stream, None)
    parquet = tmp_path / good.key / "teacher.parquet"
    parquet.write_bytes(parquet.read_bytes()[:100])
    messages: list[str] = []
    rebuilt = _build(tmp_path, method, model, stream, None, log=messages.append)
    assert any("unreadable" in m and "rebuilding" in m for m in messages)
    assert torch.equal(rebuilt.logits, good.logits)
    assert torch.equal(TeacherCache.read(tmp_path / good.key).logits, good.logits)


def test_the_base_fingerprint_does_not_depend_on_the_folder_it_was_read_from(make_model, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    make_model().save_pretrained(tmp_path / "here")
    make_model().save_pretrained(tmp_path / "elsewhere" / "there")
    here = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "here")
    there = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "elsewhere" / "there")
    assert here.config._name_or_path != there.config._name_or_path
    assert model_fingerprint(here) == model_fingerprint(there)
    with torch.no_grad():
        next(there.parameters())[0, 0] += 1.0
    assert model_fingerprint(here) != model_fingerprint(there)
