"""The digits benchmark data: tokenizers, splits, Parquet schema."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from trainables.benchmarks.digits.data import SCHEMA, DigitsConfig, build_digits, read_tasks, split_indices, vocabulary
from trainables.benchmarks.digits.tiny import make_vocabulary_map
from trainables.benchmarks.digits.tokenizers import PixelQuantizer, WordTokenizer
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
    assert set(table.column("task").to_pylist()) >= {"caption", "generate", "parity", "next", "previous", "bigsmall"}


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
            assert row["answer_text"] in ("even", "odd") and tokens[-1] == ids.eos


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
