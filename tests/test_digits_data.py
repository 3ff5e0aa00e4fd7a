"""The digits benchmark data: tokenizers, splits, Parquet schema."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import NUM_CODES, randomize_adapters
from trainables.batching import SampleSet
from trainables.benchmarks.digits import evaluate
from trainables.benchmarks.digits.data import (
    SCHEMA,
    UNDERSTANDING_TASKS,
    DigitsConfig,
    SequenceBuilder,
    balanced_choice,
    build_digits,
    read_tasks,
    split_indices,
    vocabulary,
)
from trainables.benchmarks.digits.evaluate import answer_accuracy, next_token_logits
from trainables.benchmarks.digits.tiny import make_vocabulary_map
from trainables.benchmarks.digits.tokenizers import DIGIT_WORDS, PixelQuantizer, WordTokenizer
from trainables.losses import causal_lm_logits, unwrap
from trainables.methods import MethodConfig, build_method
from trainables.vocab import TokenIds

SMALL = DigitsConfig(task_train=40, task_test=20)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("digits"), SMALL) / "tasks.parquet"


def test_quantizer_round_trip_is_exact_on_codes_and_close_on_pixels():
    quantizer = PixelQuantizer(levels=8)
    images = np.arange(17, dtype=np.float64).repeat(4).reshape(1, 68)[:, :64]
    codes = quantizer.encode(images)
    assert codes.min() == 0 and codes.max() == 7
    assert np.array_equal(quantizer.encode(quantizer.decode(codes)), codes)
    assert np.abs(quantizer.decode(codes) - images).max() <= (17 / 8) / 2 + 1e-9
    with pytest.raises(ValueError, match="levels"):
        PixelQuantizer(levels=1)


def test_word_tokenizer_round_trip_and_unknown_words():
    tokenizer = WordTokenizer(make_vocabulary_map(["draw", "a", "one"], 4))
    assert tokenizer.decode(tokenizer.encode("draw a one")) == "draw a one"
    with pytest.raises(ValueError, match="zebra"):
        tokenizer.encode("draw a zebra")


def test_splits_are_disjoint_and_test_images_never_train(task_file):
    train, test = split_indices(SMALL, 1797)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1797
    table = read_tasks(task_file)
    train_images = {tuple(i) for i in read_tasks(task_file, split="train").column("image").to_pylist()}
    test_images = {tuple(i) for i in read_tasks(task_file, split="test").column("image").to_pylist()}
    # identical 8×8 bitmaps can occur twice in the dataset; compare by index-free content only
    assert len(train_images & test_images) <= 2
    assert pq.read_schema(task_file).equals(SCHEMA, check_metadata=False)
    assert set(table.column("task").to_pylist()) == {"caption", "identity", "generate", *UNDERSTANDING_TASKS}


def test_sequences_follow_the_schema(task_file):
    ids = TokenIds.from_vocabulary_map(vocabulary(SMALL))
    for row in read_tasks(task_file, ["parity", "generate"], "test").to_pylist()[:50]:
        tokens = row["input_ids"]
        assert tokens[row["image_start"]] == ids.begin_image and tokens[row["image_end"]] == ids.end_image
        assert row["image_end"] - row["image_start"] == 65
        assert tokens[row["answer_start"] - 1] == ids.separator and tokens.count(ids.separator) == 1
        if row["is_generation"]:
            assert row["image_start"] == row["answer_start"] and row["image_end"] == len(tokens) - 1
        else:
            assert row["answer_text"] in ("yes", "no") and tokens[-1] == ids.eos


def test_build_is_deterministic(tmp_path):
    first = read_tasks(build_digits(tmp_path / "a", SMALL) / "tasks.parquet")
    second = read_tasks(build_digits(tmp_path / "b", SMALL) / "tasks.parquet")
    assert first.equals(second)


def test_wrong_schema_is_refused(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"task": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        read_tasks(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_tasks(tmp_path / "absent.parquet")


def test_base_model_cache_key_changes_with_config_data_and_code(monkeypatch):
    from trainables.benchmarks.digits import base_model
    from trainables.benchmarks.digits.config import BaseModelConfig

    key = base_model.base_key(BaseModelConfig(), SMALL)
    assert base_model.base_key(BaseModelConfig(), SMALL) == key
    assert base_model.base_key(BaseModelConfig(epochs=5), SMALL) != key
    assert base_model.base_key(BaseModelConfig(), DigitsConfig(seed=1, task_train=40, task_test=20)) != key
    monkeypatch.setattr(base_model, "code_version", lambda: "edited")
    assert base_model.base_key(BaseModelConfig(), SMALL) != key


# The "yes" digits of every continual task, written out by hand from the task's definition.
YES_DIGITS = {
    "parity": {0, 2, 4, 6, 8},
    "bigsmall": {5, 6, 7, 8, 9},
    "prime": {2, 3, 5, 7},
    "square": {0, 1, 4, 9},
    "round": {0, 6, 8, 9},
    "fibonacci": {0, 1, 2, 3, 5, 8},
}


def test_every_task_answers_correctly_for_every_digit():
    assert set(UNDERSTANDING_TASKS) == set(YES_DIGITS) and len(UNDERSTANDING_TASKS) >= 6
    for task, spec in UNDERSTANDING_TASKS.items():
        assert spec.answers == ("yes", "no")
        assert [spec.answer(d) for d in range(10)] == ["yes" if d in YES_DIGITS[task] else "no" for d in range(10)]


def test_task_rows_hold_the_right_answer_and_half_are_yes(task_file):
    vocab = vocabulary(SMALL)
    for task in UNDERSTANDING_TASKS:
        for split, size in (("train", SMALL.task_train), ("test", SMALL.task_test)):
            rows = read_tasks(task_file, [task], split).to_pylist()
            assert len(rows) == size
            assert sum(r["answer_text"] == "yes" for r in rows) == size // 2
            for row in rows:
                assert row["answer_text"] == ("yes" if row["digit"] in YES_DIGITS[task] else "no")
                assert row["input_ids"][row["answer_start"]] == vocab[row["answer_text"]]


def test_identity_questions_are_yes_exactly_for_the_shown_digit(task_file):
    vocab = vocabulary(SMALL)
    rows = read_tasks(task_file, ["identity"], "train").to_pylist()
    asked_words = {vocab[w]: d for d, w in enumerate(DIGIT_WORDS)}
    for row in rows:
        asked = asked_words[row["input_ids"][row["answer_start"] - 2]]  # "is it <digit> <sep>"
        assert row["answer_text"] == ("yes" if asked == row["digit"] else "no")
    share_yes = sum(r["answer_text"] == "yes" for r in rows) / len(rows)
    assert 0.45 < share_yes < 0.55


def test_the_seed_varies_split_and_sampling(tmp_path):
    other = DigitsConfig(task_train=40, task_test=20, seed=1)
    assert not np.array_equal(split_indices(SMALL, 1797)[1], split_indices(other, 1797)[1])
    first = read_tasks(build_digits(tmp_path / "s0", SMALL) / "tasks.parquet", ["prime"], "train")
    second = read_tasks(build_digits(tmp_path / "s1", other) / "tasks.parquet", ["prime"], "train")
    assert first.column("image").to_pylist() != second.column("image").to_pylist()


def test_balanced_choice_takes_equal_shares_and_refuses_too_many():
    rng = np.random.default_rng(0)
    indices, answers = np.arange(10), np.array(["yes"] * 3 + ["no"] * 7)
    picked = balanced_choice(indices, answers, 5, rng)
    assert len(set(picked.tolist())) == 5
    assert sorted(answers[picked].tolist()).count("yes") in (2, 3)
    with pytest.raises(ValueError, match="only 3 images answer 'yes'"):
        balanced_choice(indices, answers, 8, rng)


class _LookBackLM(torch.nn.Module):
    """A stand-in language model whose next-token logits at each position are ``table[previous
    token]``: the logits after ``<question word> <sep>`` are the question word's row."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.lm_head = torch.nn.Identity()
        outer = self

        class Decoder(torch.nn.Module):
            def forward(self, input_ids, attention_mask=None, use_cache=False, **unused):
                previous = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
                return SimpleNamespace(last_hidden_state=outer.table[previous])

        self.model = Decoder()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # answer_accuracy reads the device from a parameter


def test_constrained_and_open_scoring_on_hand_made_logits():
    vocab = vocabulary(DigitsConfig())
    builder = SequenceBuilder(vocab, PixelQuantizer(8))
    ids = builder.ids
    table = torch.zeros(len(vocab), len(vocab))
    prime, square = vocab["prime"], vocab["square"]
    # after "prime": yes 2 > no 1 among the answers, but "even" 5 and an image code 9 rank higher
    table[prime, vocab["yes"]], table[prime, vocab["no"]], table[prime, vocab["even"]] = 2.0, 1.0, 5.0
    table[prime, ids.image_codes[0]] = 9.0  # never a text answer: masked in both scorings
    table[square, vocab["no"]], table[square, vocab["yes"]] = 3.0, 1.0  # "no" wins everywhere
    samples = [(prime, "yes"), (square, "no"), (square, "yes"), (prime, "no")]
    sequences = [[ids.bos, word, ids.separator, vocab[answer], ids.eos] for word, answer in samples]
    scores = answer_accuracy(_LookBackLM(table), sequences, [3] * 4, builder, [vocab["yes"], vocab["no"]])
    # constrained: yes ✓, no ✓, no ✗, yes ✗ → 2/4; open: even ✗, no ✓, no ✗, even ✗ → 1/4
    assert scores.constrained == pytest.approx(0.5) and scores.open == pytest.approx(0.25)


def _ask(seq, codes, question):
    """An understanding prompt: everything before the answer."""
    return seq.understanding(codes, question, "one")[:-2]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "unpacked"])
@pytest.mark.parametrize("method", ["mode", "seq_lora", "moelora"])
def test_packed_prompts_get_the_logits_each_prompt_gets_alone(method, attention, make_model, seq, ids, monkeypatch):
    """Prompts that share an image are packed into one row (the image once, each question as its
    own block): every prompt's next-token logits match the prompt run alone, while the model reads
    fewer tokens. Questions of different lengths, one image asked once, a prompt without an image,
    one that ends at its image and one that opens a second image after the question (both get a
    row of their own: MoDE would route the blocks after an open span as image), and chunks that
    split the packed rows (rows=2). sdpa takes a bool mask, eager an additive one; an attention
    implementation without custom masks gets one prompt per row."""
    base = make_model()
    if attention == "eager":
        base.set_attn_implementation("eager")
    if attention == "unpacked":
        monkeypatch.setattr(evaluate, "_PACKING_ATTENTION", ())
    model = build_method(MethodConfig(name=method, r=2, num_experts=2), ids).attach(base).eval()
    randomize_adapters(model)  # non-zero experts and V-Adapter: routing matters
    shared, other = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10]
    asks = [(shared, "is this even"), (other, "what digit is this"), (shared, "is"), (shared, "what digit"),
            (other, "odd"), ([11, 12], "is this two")]  # fmt: skip
    prompts = [_ask(seq, codes, question) for codes, question in asks]
    prompts.append([ids.bos, *seq.words("draw two"), ids.separator])  # no image
    prompts.append([ids.bos, *seq.image(shared)])  # ends at its image
    prompts.append([ids.bos, *seq.image(shared), *seq.words("what"), ids.begin_image, ids.image_codes[3]])
    read = []  # input_ids shapes the decoder is called with
    decoder = unwrap(model).model
    hook = decoder.register_forward_pre_hook(
        lambda _module, _args, kwargs: read.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    packed = next_token_logits(model, prompts, ids, rows=2)
    hook.remove()
    with torch.no_grad():
        alone = torch.stack([causal_lm_logits(model, torch.tensor([p]))[0, -1] for p in prompts])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    if attention == "unpacked":
        assert sum(rows for rows, _ in read) == len(prompts)
    else:  # rows: the shared image's 3 questions, the other image's 2, then one each for the rest
        assert sum(rows for rows, _ in read) == 6 and len(read) == 3
        assert sum(rows * width for rows, width in read) < sum(len(p) for p in prompts)


def test_all_tasks_scored_together_equal_each_task_scored_alone(make_model, seq, ids, vocab):
    """``answer_accuracies`` over several tasks that ask about the same images (packed across
    tasks) gives each task the scores and per-sample predictions it gets alone."""
    model = build_method(MethodConfig(name="mode", r=2, num_experts=2), ids).attach(make_model()).eval()
    randomize_adapters(model, scale=0.5)  # answers that differ between samples
    builder = SimpleNamespace(ids=ids)
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 16, (6,), generator=generator).tolist() for _ in range(5)]
    answers = [vocab["even"], vocab["odd"]]
    tests = {
        "parity": ([seq.understanding(c, "is this even", "even") for c in images], None, answers),
        "digit": ([seq.understanding(c, "what digit is this", "one") for c in images[1:]], None, None),
        "short": ([seq.understanding(c, "is", "odd") for c in images[::2]], None, answers),
    }
    tests = {task: (rows, [len(r) - 2 for r in rows], answer_ids) for task, (rows, _, answer_ids) in tests.items()}
    read = []  # rows per decoder call
    hook = unwrap(model).model.register_forward_pre_hook(
        lambda _module, _args, kwargs: read.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    together = evaluate.answer_accuracies(model, tests, builder)
    hook.remove()
    assert sum(read) == len(images)  # 12 questions, one row per image
    for task, (rows, starts, answer_ids) in tests.items():
        alone = answer_accuracy(model, rows, starts, builder, answer_ids)
        assert together[task] == alone, task


@pytest.mark.parametrize("rows", [3, 100])
def test_image_nll_is_the_mean_over_every_image_token_whatever_the_rows_per_forward(
    rows, make_model, seq, ids, monkeypatch
):
    """``image_nll`` reads the sequences ``ROWS_PER_FORWARD`` at a time (chunks of 3, 3 and 1 here,
    or all 7 at once). Whatever the chunks, it is the mean NLL over every labelled token (begin-image
    through end-image) of every sequence, over the image vocabulary, computed here one sequence at a
    time. The prompts differ in length, so the chunks are padded differently and hold different
    numbers of tokens."""
    monkeypatch.setattr(evaluate, "ROWS_PER_FORWARD", rows)
    model = build_method(MethodConfig(name="mode", r=2, num_experts=2), ids).attach(make_model()).eval()
    randomize_adapters(model, scale=0.5)
    generator = torch.Generator().manual_seed(0)
    prompts = ["draw two", "draw", "draw zero one"]
    sequences = [
        seq.generation(prompts[i % 3], torch.randint(0, NUM_CODES, (6,), generator=generator).tolist())
        for i in range(7)
    ]
    image_vocab = ids.image_vocab_mask().nonzero().squeeze(-1)
    position_in_image_vocab = {int(token): index for index, token in enumerate(image_vocab)}
    total, count = 0.0, 0
    with torch.no_grad():
        for sequence in sequences:
            after_separator = sequence.index(ids.separator) + 1
            logits = causal_lm_logits(model, torch.tensor([sequence]))[0, after_separator - 1 : -1, image_vocab]
            targets = torch.tensor([position_in_image_vocab[t] for t in sequence[after_separator:]])
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            count += len(targets)
    samples = SampleSet(sequences, [True] * len(sequences), ids.pad)
    assert evaluate.image_nll(model, samples, SimpleNamespace(ids=ids)) == pytest.approx(total / count, rel=1e-5)
