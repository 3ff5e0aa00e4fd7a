"""CoIN evaluation sharded across workers (``sharded_eval``): two gloo processes on CPU, each with the
same tiny real-layout model (MoDE attached, adapters randomised) and CoIN data with odd test counts
(uneven shards, one of them empty), return the same accuracies, image-token scores, sampled
text-to-image scores and responses as each other and as a single process."""

from __future__ import annotations

import json
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainables.benchmarks.coin.benchmark import CoinBenchmark
from trainables.benchmarks.coin.chameleon import build_real_layout_chameleon, load_chameleon, save_model_dir
from trainables.config import load_run_config_dict
from trainables.distributed import Distributed
from trainables.methods import build_method
from trainables.vocab import TokenIds

WORLD = 2


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Model directory, imported CoIN data (ScienceQA: 5 test prompts of varied length, ImageNet: 1,
    generation: 5 held-out captioned images), a tiny VQGAN and a tiny CLIP; the run config dict."""
    from safetensors.torch import save_file

    from orchestrator.cli import main
    from tests.test_coin import SEPARATOR, SHAPE, _sqa, _write_image
    from tests.test_t2i import TINY, TOKENS, _tiny_clip_dir, _write_yaml
    from trainables.benchmarks.coin.vqgan import VQGANDecoder

    root = tmp_path_factory.mktemp("sharded")
    model, tokenizer = build_real_layout_chameleon(SHAPE, vq_resolution=16, seed=0)
    ids = TokenIds.from_vocabulary_map(model.config.vocabulary_map, separator=SEPARATOR)
    model_dir = save_model_dir(model, tokenizer, root / "model")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        _write_image(images / f"{i}.png", i)
    sqa_train = _jsonl(root / "sqa_train.jsonl", [_sqa(i, "0.png" if i == 0 else None) for i in range(2)])
    sqa_test = [_sqa(10, "1.png", "A"), _sqa(11, None), _sqa(12, "2.png")]
    sqa_test.append({"id": "s13", "conversations": [{"from": "human", "value": "Yes?\nA. no\nB. yes"}]})
    sqa_test[-1]["conversations"].append({"from": "gpt", "value": "B"})
    sqa_test.append(
        {
            "id": "s14",
            "conversations": [
                {"from": "human", "value": "Which of these is the coldest place on a winter night?\nA. ice\nB. sun"},
                {"from": "gpt", "value": "A"},
            ],
        }
    )
    sqa_test = _jsonl(root / "sqa_test.jsonl", sqa_test)
    in_record = {"id": "in-0", "image": "0.png"}
    in_record["conversations"] = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "tench"}]
    in_train = _jsonl(root / "in_train.jsonl", [in_record])
    in_test = _jsonl(
        root / "in_test.jsonl", [{"question_id": 0, "image": "1.png", "text": "What is it?", "answers": ["x"]}]
    )
    codes = ids.image_codes
    stream = [
        {"image_tokens": list(codes[i * 5 : i * 5 + TOKENS]), "caption": f"photo {i} of a thing."} for i in range(10)
    ]
    laion = _jsonl(root / "laion.jsonl", stream)
    data = root / "data"
    common = ["data", "import-coin", "--model", str(model_dir), "--out", str(data), "--image-root", str(images)]
    assert main([*common, "--task", "ScienceQA", "--train", str(sqa_train), "--test", str(sqa_test)]) == 0
    assert main([*common, "--task", "ImageNet", "--train", str(in_train), "--test", str(in_test)]) == 0
    assert main([*common, "--generation", str(laion), "--gen-holdout", "0.5"]) == 0
    torch.manual_seed(2)
    decoder = VQGANDecoder(TINY)
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(root / "vqgan.safetensors"))
    _write_yaml(root / "vqgan.yaml", TINY)
    coin = {"model": str(model_dir), "data_dir": str(data), "max_new_tokens": 3, "eval_batch_size": 2}
    coin |= {"vqgan": str(root / "vqgan.safetensors"), "clip_model": str(_tiny_clip_dir(root))}
    config = {"tasks": ["ScienceQA", "ImageNet"], "method": {"name": "mode", "r": 2, "num_experts": 2}, "coin": coin}
    return {"root": root, "config": load_run_config_dict(config).to_dict(), "model_dir": str(model_dir)}


class _TokenText:
    """Stands in for the tiny tokenizer (whose 260 byte tokens the random model never picks): a
    response is the option letter of its first token's parity, then its token ids, so responses
    show every decoded token and ScienceQA accuracies are neither 0 nor 1."""

    def decode(self, tokens, skip_special_tokens=True) -> str:
        return f"{'AB'[tokens[0] % 2]}. {' '.join(map(str, tokens))}" if tokens else ""


def _evaluate(config_dict: dict, model_dir: str, dist: Distributed | None) -> dict:
    """Everything a rank (or the single process) computes; the same calls, in the same order, on every rank."""
    from transformers import ChameleonConfig

    from tests.conftest import randomize_adapters

    config = load_run_config_dict(config_dict)
    model_config = ChameleonConfig.from_pretrained(model_dir)
    bench = CoinBenchmark(config, model_config, log=lambda *_: None)
    bench.tokenizer = _TokenText()
    model = build_method("mode", bench.ids, r=2, num_experts=2).attach(load_chameleon(model_dir, "float32"))
    randomize_adapters(model, seed=1, scale=0.5)
    full = bench.evaluate(model, 0, dist=dist)
    partial = bench.evaluate(model, 1, tasks=[1], generation=False, dist=dist)
    answers = {task: bench.answers(model, task, dist) for task in config.tasks}
    return {
        "full": full,
        "partial": partial,
        "answers": answers,
        "reference": bench._t2i["reference"],
        "counts": {task: bench.tests[task].num_rows for task in config.tasks}
        | {"generation": len(bench.test_generation)},
    }


def _worker(rank: int, world: int, init_file: str, config_dict: dict, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        dist = Distributed()
        assert (dist.rank, dist.world) == (rank, world)
        torch.save(_evaluate(config_dict, model_dir, dist), Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _assert_same(got, want, exact_keys=()) -> None:
    """(row, scores): accuracies exactly equal (NaN = NaN), float scores within 1e-6."""
    (row, scores), (want_row, want_scores) = got, want
    assert len(row) == len(want_row)
    for a, b in zip(row, want_row, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == b, (row, want_row)
    assert scores.keys() == want_scores.keys()
    for key, value in scores.items():
        expected = want_scores[key]
        if math.isnan(expected):
            assert math.isnan(value), key
        elif key in exact_keys:
            assert value == expected, key
        else:
            assert value == pytest.approx(expected, rel=1e-6, abs=1e-6), key


def test_sharded_evaluation_equals_single_process(setup, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker
    try:
        single = _evaluate(setup["config"], setup["model_dir"], None)
    finally:
        torch.set_num_threads(threads)
    # Odd test counts: uneven shards, and rank 1 has no ImageNet prompt at all.
    assert single["counts"] == {"ScienceQA": 5, "ImageNet": 1, "generation": 5}
    assert all(math.isfinite(single["full"][1][k]) for k in ("nll", "accuracy", "text_align", "image_align", "fd_clip"))
    assert len(single["reference"]) == 5
    assert len(set(single["answers"]["ScienceQA"])) == 5  # the random model answers every prompt differently
    assert 0 < single["full"][0][0] < 1, single["answers"]

    out = tmp_path / "out"
    out.mkdir()
    args = (WORLD, str(tmp_path / "rendezvous"), setup["config"], setup["model_dir"], str(out))
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for result in ranks:
        assert result["answers"] == single["answers"]  # every greedy response, in test order
        _assert_same(result["full"], single["full"], exact_keys=("accuracy",))
        _assert_same(result["partial"], single["partial"])
        torch.testing.assert_close(result["reference"], single["reference"], rtol=0, atol=1e-6)
    # The ranks agree exactly with each other.
    assert ranks[0]["answers"] == ranks[1]["answers"]
    for key in ("full", "partial"):
        (row0, scores0), (row1, scores1) = ranks[0][key], ranks[1][key]
        assert [str(v) for v in row0] == [str(v) for v in row1] and str(scores0) == str(scores1)
    assert torch.equal(ranks[0]["reference"], ranks[1]["reference"])
