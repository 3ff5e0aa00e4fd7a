"""The real-scale path on tiny models with the real checkpoint's structure: a 65,536-id vocabulary
map laid out as Anole-7B's (codebook 4..8195, end-image 8196, begin-image 8197), a VQ-VAE with the
real 8,192-code codebook, CoIN-format files → import → MoDE training → evaluation → metrics."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator.cli import main
from trainables.batching import SampleSet
from trainables.benchmarks.coin.chameleon import (
    build_real_layout_chameleon,
    image_processor_for,
    load_chameleon,
    save_model_dir,
)
from trainables.benchmarks.coin.decoding import greedy_decode
from trainables.benchmarks.coin.scoring import (
    exact_match,
    imagenet_correct,
    is_correct,
    parse_options,
    scienceqa_correct,
)
from trainables.benchmarks.coin.store import read_split
from trainables.config import RunConfig, load_run_config, load_run_config_dict
from trainables.engine import run_sequence
from trainables.methods import build_method
from trainables.mode import record_routing
from trainables.mode.checkpointing import enable_activation_checkpointing
from trainables.model_shape import ChameleonShape
from trainables.vocab import TokenIds

ROOT = Path(__file__).resolve().parent.parent
SHAPE = ChameleonShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SEPARATOR = "<reserved08706>"


def _write_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sqa(i: int, image: str | None, answer: str = "B") -> dict:
    question = "<image>\nWhich is a mammal?\nA. frog\nB. dog" if image else "Which is warm?\nA. ice\nB. sun"
    record = {"id": f"sqa-{i}", "conversations": [{"from": "human", "value": question}]}
    record["conversations"].append({"from": "gpt", "value": answer})
    if image:
        record["image"] = image
    return record


@pytest.fixture(scope="module")
def coin(tmp_path_factory):
    """A saved real-layout tiny checkpoint, CoIN-format files with PNG images, and their import."""
    root = tmp_path_factory.mktemp("coin")
    model, tokenizer = build_real_layout_chameleon(SHAPE, vq_resolution=16, seed=0)
    model_dir = save_model_dir(model, tokenizer, root / "model")
    images = root / "images"
    images.mkdir()
    for i in range(4):
        _write_image(images / f"{i}.png", i)
    sqa_train = _jsonl(root / "sqa_train.jsonl", [_sqa(i, f"{i % 4}.png" if i % 2 == 0 else None) for i in range(4)])
    sqa_test = _jsonl(
        root / "sqa_test.jsonl",
        [{"question_id": 7, "image": "1.png", "text": "<image>\nPick one.\nA. cat\nB. dog", "answer": "A"}],
    )
    imagenet_train = root / "imagenet_train.json"  # CoIN's JSON-list format
    imagenet_train.write_text(
        json.dumps(
            [
                {
                    "id": f"in-{i}",
                    "image": f"{i}.png",
                    "conversations": [
                        {"from": "human", "value": "What is the object in the image?\n<image>"},
                        {"from": "gpt", "value": ["tench", "goldfish"][i % 2]},
                    ],
                }
                for i in range(4)
            ]
        )
    )
    imagenet_test = _jsonl(
        root / "imagenet_test.jsonl",
        [{"question_id": i, "image": f"{i}.png", "text": "What is it?", "answers": ["goldfish"]} for i in range(2)],
    )
    ids = TokenIds.from_vocabulary_map(model.config.vocabulary_map, separator=SEPARATOR)
    codes = ids.image_codes
    stream = [{"image_tokens": [ids.begin_image, *codes[i : i + 16], ids.end_image]} for i in range(6)]
    stream += [{"image": f"{i}.png", "caption": f"a picture number {i}"} for i in range(2)]
    generation = _jsonl(root / "laion.jsonl", stream)
    out = root / "data"
    common = ["data", "import-coin", "--model", str(model_dir), "--out", str(out), "--image-root", str(images)]
    common += ["--shard-size", "2", "--batch-size", "3"]
    assert main([*common, "--task", "ScienceQA", "--train", str(sqa_train), "--test", str(sqa_test)]) == 0
    assert main([*common, "--task", "ImageNet", "--train", str(imagenet_train), "--test", str(imagenet_test)]) == 0
    assert main([*common, "--generation", str(generation), "--gen-holdout", "0.25"]) == 0
    return {"root": root, "model_dir": model_dir, "model": model, "tokenizer": tokenizer, "ids": ids}


def test_real_layout_vocabulary(coin):
    vocabulary_map = coin["model"].config.vocabulary_map
    ids = coin["ids"]
    assert coin["model"].config.vocab_size == len(vocabulary_map) == 65536
    assert ids.image_codes == tuple(range(4, 8196))
    assert (ids.end_image, ids.begin_image, ids.separator) == (8196, 8197, 8710)
    assert ids.image_placeholder == 8711


def test_import_writes_sharded_tokenised_parquet(coin):
    data, ids, tokenizer, model = coin["root"] / "data", coin["ids"], coin["tokenizer"], coin["model"]
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tasks"]["ScienceQA"]["train"] == {"records": 4, "shards": 2}
    assert manifest["tasks"]["ImageNet"]["test"] == {"records": 2, "shards": 1}
    assert manifest["generation"] == {"stream": {"records": 6, "shards": 3}, "test": {"records": 2, "shards": 1}}
    assert len(list((data / "ScienceQA" / "train").glob("part-*.parquet"))) == 2
    table = read_split(data, "ImageNet", "train")
    row = table.slice(0, 1).to_pylist()[0]
    sequence, start = row["input_ids"], row["answer_start"]
    assert sequence[0] == ids.bos and sequence[start - 1] == ids.separator and sequence[-1] == ids.eos
    assert tokenizer.decode(sequence[start:-1]) == "tench"
    # The question's <image> marker is at its end: the image span follows the question text.
    begin = sequence.index(ids.begin_image)
    assert tokenizer.decode(sequence[1:begin]) == "What is the object in the image?"
    span = sequence[begin : sequence.index(ids.end_image) + 1]
    with Image.open(coin["root"] / "images" / "0.png") as image:
        values = image_processor_for(model.config)(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
    expected = model.model.get_image_tokens(values)[0].tolist()
    assert span == [ids.begin_image, *expected, ids.end_image]  # the model's own get_image_tokens
    text_only = read_split(data, "ScienceQA", "train").to_pylist()[1]
    assert ids.begin_image not in text_only["input_ids"]
    stream = read_split(data, "generation", "stream").to_pylist()
    assert all(r["is_generation"] and r["input_ids"][r["answer_start"]] == ids.begin_image for r in stream)


def test_import_resumes_and_keeps_finished_shards(coin, capsys):
    root = coin["root"]
    data = root / "data"
    shard = data / "ScienceQA" / "train" / "part-00001.parquet"
    kept = data / "ScienceQA" / "train" / "part-00000.parquet"
    before, kept_mtime = pq.read_table(shard), kept.stat().st_mtime_ns
    shard.unlink()  # as if the import had been killed while writing the second shard
    args = ["data", "import-coin", "--model", str(coin["model_dir"]), "--out", str(data)]
    args += ["--image-root", str(root / "images"), "--shard-size", "2", "--task", "ScienceQA"]
    args += ["--train", str(root / "sqa_train.jsonl"), "--test", str(root / "sqa_test.jsonl")]
    capsys.readouterr()
    assert main(args) == 0
    assert "ScienceQA/train: 1 shard(s) written" in capsys.readouterr().out
    assert pq.read_table(shard).equals(before) and kept.stat().st_mtime_ns == kept_mtime
    # A different source for an imported split is refused, not mixed in.
    other = _jsonl(root / "sqa_other.jsonl", [_sqa(9, None, "A")])
    changed = [*args[:-4], "--train", str(other)]
    assert main(changed) == 2
    assert "already imported with different" in capsys.readouterr().err


def _coin_config(coin, **coin_overrides) -> RunConfig:
    root = coin["root"]
    data = {
        "tasks": ["ScienceQA", "ImageNet"],
        "method": {"name": "mode", "r": 2, "num_experts": 2},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3},
        "resources": {"cpus_per_worker": 1},
        "coin": {
            "model": str(coin["model_dir"]),
            "data_dir": str(root / "data"),
            "max_new_tokens": 4,
            "eval_batch_size": 2,
            **coin_overrides,
        },
    }
    return load_run_config_dict(data)


def test_mode_training_and_evaluation_end_to_end(coin, tmp_path):
    config = _coin_config(coin, gradient_checkpointing=True)
    results = run_sequence(config, tmp_path / "work", tmp_path / "out", log=lambda message: None)
    assert np.array(results["acc_matrix"]).shape == (3, 2)
    assert all(0.0 <= value <= 1.0 for row in results["acc_matrix"] for value in row)
    assert [len(losses) for losses in results["losses"]] == [1, 1]  # one step per task (4 samples, batch 4)
    assert all(math.isfinite(loss) and loss > 0 for losses in results["losses"] for loss in losses)
    assert all(math.isfinite(v) and v > 0 for v in results["gen_nll"])
    assert all(0.0 <= v <= 1.0 for v in results["gen_acc"])  # image-token top-1 on held-out generation rows
    assert all(math.isnan(v) for v in results["gen_fd"])  # no VQ decoder in transformers: no FID
    assert math.isfinite(results["avg_acc"]) and results["forgetting"] is not None
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["config"]["coin"]["model"] == str(coin["model_dir"])


def _step(model, method, batch, stream):
    terms = method.loss_terms(model, batch, stream)
    loss = sum(terms.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return float(loss.detach()), grads


def test_gradient_checkpointing_keeps_loss_routing_and_gradients(coin):
    data = coin["root"] / "data"
    ids = coin["ids"]
    table = read_split(data, "ScienceQA", "train")
    samples = SampleSet.from_table(table, ids.pad)
    batch = samples.batch([0, 1, 2, 3])
    width = batch.input_ids.shape[1]
    # Distillation rows of the task batch's shape: a recompute that read the KD pass's routing
    # instead of its own would run silently, with every token routed as an image token.
    stream_rows = [[ids.begin_image, *ids.image_codes[i : i + width - 2], ids.end_image] for i in range(4)]
    stream = SampleSet(stream_rows, [True] * 4, ids.pad).stream_batch_of([0, 1, 2, 3])
    method = build_method("mode", ids, r=2, num_experts=2, dropout=0.1)

    def run(checkpointing: str):
        model = method.attach(load_chameleon(str(coin["model_dir"]), "float32")).train()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "mode_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
        if checkpointing == "routing-aware":
            enable_activation_checkpointing(model)
        elif checkpointing == "plain-hf":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(0)  # same dropout masks in every variant
        with record_routing(model) as records:
            loss, grads = _step(model, method, batch, stream)
        masks = [r["image_mask"] for r in records]
        return loss, grads, masks

    loss_off, grads_off, masks_off = run("off")
    loss_on, grads_on, masks_on = run("routing-aware")
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    assert len(masks_on) == len(masks_off) and all(torch.equal(a, b) for a, b in zip(masks_on, masks_off, strict=True))
    assert grads_on.keys() == grads_off.keys() and len(grads_on) > 0
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Without the routing replay, HF's recompute of the task batch runs under the routing of the
    # pass that ran last (the KD pass, all image tokens): the layers take the V-Adapter-only path,
    # save other tensors than their forward did, and torch's checkpoint refuses the recompute.
    with pytest.raises(torch.utils.checkpoint.CheckpointError, match="different number of tensors"):
        run("plain-hf")


def test_greedy_decoding_is_the_same_in_any_batch(coin):
    model, ids = coin["model"], coin["ids"]
    method = build_method("mode", ids, r=2, num_experts=2)
    attached = method.attach(load_chameleon(str(coin["model_dir"]), "float32"))
    table = read_split(coin["root"] / "data", "ImageNet", "train").to_pylist()
    prompts = [r["input_ids"][: r["answer_start"]] for r in table]
    prompts.append(prompts[0][:5])  # a much shorter prompt: left padding inside the batch
    together = greedy_decode(attached, prompts, ids, max_new_tokens=5, batch_size=8)
    alone = [greedy_decode(attached, [p], ids, max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    assert all(len(t) <= 5 and not set(t) & set(ids.image_codes) for t in together)
    assert model is not attached


def test_paper_config_dry_run_without_weights(capsys):
    config = load_run_config(ROOT / "search_spaces" / "anole7b_coin.yaml")
    method, train, coin = config.method, config.train, config.coin
    assert (method.name, method.r, method.alpha, method.num_experts, method.dropout) == ("mode", 8, 16.0, 4, 0.05)
    assert (method.kd_weight, method.kd_temperature) == (0.3, 2.0)
    assert (train.lr, train.warmup_ratio, train.epochs, train.batch_size, train.grad_clip) == (1e-4, 0.1, 1, 8, 10.0)
    assert (coin.dtype, coin.max_length, config.resources.num_workers) == ("bfloat16", 2048, 8)
    assert config.tasks == ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz")
    assert main(["run", str(ROOT / "search_spaces" / "anole7b_coin.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "7,043,090,432" in out  # Chameleon-7B's parameters, counted on the meta device
    assert "60,456,960" in out  # MoDE adapters: 96 MLP linears × (4 experts + V-Adapter + router)
    assert "GiB" in out and "nothing was started" in out


def test_sweep_space_around_the_paper_config():
    from orchestrator.space import load_space

    space = load_space(ROOT / "search_spaces" / "anole7b_coin_sweep.yaml", cpus_available=128)
    assert space.size == 10
    configs = [space.trial_config(trial) for trial in space.trials]
    assert {c.method.name for c in configs} == {"mode", "seq_lora", "moelora"}
    assert all(c.coin is not None and c.coin.max_length == 2048 for c in configs)


def test_digits_config_dict_and_hash_have_no_coin_section():
    config = RunConfig()
    assert "coin" not in config.to_dict()
    assert load_run_config_dict(config.to_dict()).config_hash() == config.config_hash()


@pytest.mark.parametrize("case", ["missing_image", "bad_json_line", "missing_answer", "missing_model"])
def test_bad_inputs_fail_in_one_line_and_write_nothing(coin, tmp_path, capsys, case):
    images = coin["root"] / "images"
    model = str(coin["model_dir"])
    good = _sqa(0, "0.png")
    path = tmp_path / "train.jsonl"
    if case == "missing_image":
        _jsonl(path, [good, _sqa(1, "missing.png")])
        expected = f"{path}:2: image {images / 'missing.png'} not found"
    elif case == "bad_json_line":
        path.write_text(json.dumps(good) + "\n\n" + '{"id": "x", "conversations": [\n')
        expected = f"{path}:3: not valid JSON"
    elif case == "missing_answer":
        _jsonl(path, [good, {"id": "q", "image": "0.png", "text": "What is it?"}])
        expected = f"{path}:2: no answer"
    else:
        _jsonl(path, [good])
        model = str(tmp_path / "no-such-model")
        expected = f"--model: {model} does not exist"
    out = tmp_path / "out"
    args = ["data", "import-coin", "--model", model, "--out", str(out), "--image-root", str(images)]
    capsys.readouterr()
    assert main([*args, "--task", "ScienceQA", "--train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_run_with_missing_model_path_exits_2(coin, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"tasks: [ScienceQA]\ncoin:\n  model: {tmp_path / 'nope'}\n  data_dir: {coin['root'] / 'data'}\n")
    assert main(["run", str(config), "--no-ray", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"coin.model: {tmp_path / 'nope'} does not exist" in err
    assert main(["run", str(config), "--dry-run"]) == 2


def test_run_start_checks_the_checkpoints_training_memory(coin, monkeypatch):
    """CoIN's widths come from the checkpoint: its adapter and memory are checked when the run starts
    (check_inputs), with the dry-run's estimate, in bf16 or fp32 as the config loads the weights."""
    from trainables import adapter_budget
    from trainables.benchmarks.coin.benchmark import check_inputs
    from trainables.config_rules import ConfigError

    config = _coin_config(coin, max_length=8, dtype="float32")  # the tiny model: weights above activations
    config = load_run_config_dict(config.to_dict(), {"train.batch_size": 1, "method.kd_weight": 0})
    check_inputs(config)  # fits this machine
    monkeypatch.setattr(adapter_budget, "physical_memory_bytes", lambda: 2**20)
    with pytest.raises(ConfigError, match=r"^coin\.model: training needs about .* more than the 1\.0 MiB of memory"):
        check_inputs(config)
    with pytest.raises(ConfigError, match=r"^train\.batch_size: .*lower train\.batch_size or coin\.max_length"):
        check_inputs(_coin_config(coin, gradient_checkpointing=False))
    with pytest.raises(ConfigError, match=r"^method\.r: adapter rank 100000 is above the width of"):
        check_inputs(load_run_config_dict(config.to_dict(), {"method.r": 100_000}))


def test_answer_scoring_rules_on_hand_examples():
    question = "<image>\nWhich animal is a mammal?\nA. frog\nB. golden retriever\nC. snake"
    assert parse_options(question) == {"A": "frog", "B": "golden retriever", "C": "snake"}
    assert parse_options("Options: (A) red (B) blue") == {"A": "red", "B": "blue"}
    for response in ["B", "b", "B.", "(B)", "B)", "B: golden retriever", "The answer is B.", "Answer: (B)"]:
        assert scienceqa_correct(response, ["B"], question), response
    assert scienceqa_correct("Golden retriever.", ["B"], question)  # the gold option's text
    for response in ["A", "C.", "a cat", "frog", "The answer is C", ""]:
        assert not scienceqa_correct(response, ["B"], question), response
    assert imagenet_correct("This is a golden retriever.", ["golden retriever"])
    assert not imagenet_correct("a dog", ["golden retriever"])
    assert exact_match(" Yes. ", ["yes"]) and not exact_match("yes indeed", ["yes"])
    assert exact_match("two", ["2", "two"])  # any reference answer (TextVQA/VizWiz lists)
    assert is_correct("ScienceQA", "(B)", ["B"], question) and not is_correct("GQA", "(B)", ["B"], question)
    assert is_correct("ImageNet", "it is a tench", ["tench"]) and not is_correct("VizWiz", "it is a tench", ["tench"])


def test_gpu_check_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    # r 2 × 2 experts: the parameter-matched LoRA rank (7) fits the 32-wide tiny model uncapped
    assert gpu_check.main(["--tiny", "--r", "2", "--experts", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["mode", "mode_no_kd", "seq_lora"]
    for run in report["runs"]:
        assert run["tokens_per_s"] > 0 and math.isfinite(run["final_loss"]) and run["steps"] >= 2
    mode, lora = (next(r for r in report["runs"] if r["method"] == m) for m in ("mode", "seq_lora"))
    assert abs(lora["trainable_params"] / mode["trainable_params"] - 1) <= 0.05  # seq_lora is parameter-matched
    assert report["model"]["vocab_size"] == 65536 and report["model"]["image_codes"] == [4, 8195]
    assert "| mode |" in (tmp_path / "gpu_check.md").read_text()
