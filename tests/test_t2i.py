"""Sampled text-to-image evaluation: KV-cache sampling with MoDE routing, Chameleon's VQGAN decoder
(taming layout, safe loading), CLIP scores and the Fréchet distance, and their wiring into CoIN."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.cli import main
from trainables.benchmarks.coin.benchmark import CoinBenchmark
from trainables.benchmarks.coin.chameleon import build_real_layout_chameleon, save_model_dir
from trainables.benchmarks.coin.t2i import sample_image_tokens, span_codes
from trainables.benchmarks.coin.vqgan import ImageCodeMap, VQGANConfig, VQGANDecoder
from trainables.config import ConfigError, load_run_config_dict
from trainables.mode import MoDEConfig, attach_mode, record_routing
from trainables.mode.routing import image_token_mask
from trainables.model_shape import ChameleonShape
from trainables.vocab import TokenIds

SHAPE = ChameleonShape(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SEPARATOR = "<reserved08706>"
TOKENS = 16  # small_vq_config(16): 4×4 codes per image
# 16-pixel images from 4×4 codes, with attention at both coarse resolutions (exercises up.{i}.attn.{j}).
TINY = VQGANConfig(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(4, 8), z_channels=32, resolution=16, embed_dim=8
)


class NotATensor:  # pickled into a checkpoint: the safe loader must refuse it
    def __init__(self) -> None:
        self.payload = "anything"


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_real_layout_chameleon(SHAPE, vq_resolution=16, seed=0)
    ids = TokenIds.from_vocabulary_map(model.config.vocabulary_map, separator=SEPARATOR)
    return model, tokenizer, ids


def _prompts(tokenizer, ids, captions):
    return [[ids.bos, *tokenizer(c, add_special_tokens=False).input_ids, ids.separator] for c in captions]


CAPTIONS = ["photo of a cat.", "a dog", "photo of a red bicycle on grass.", "x"]


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_is_seeded_batch_independent_and_inside_the_codebook(tiny):
    model, tokenizer, ids = tiny
    prompts = _prompts(tokenizer, ids, CAPTIONS)
    batched = sample_image_tokens(model, prompts, ids, TOKENS, seed=42, batch_size=3)
    alone = [sample_image_tokens(model, [p], ids, TOKENS, seed=42)[0] for p in prompts[:1]]
    again = sample_image_tokens(model, prompts, ids, TOKENS, seed=42, batch_size=4)
    assert batched == again  # batch size does not matter
    assert alone[0] == batched[0]
    # A prompt's sample depends on its index, not its batch neighbours: prompt 1 alone with index 1.
    shifted = sample_image_tokens(model, prompts[:2], ids, TOKENS, seed=42, batch_size=1)
    assert shifted == batched[:2]
    codes = set(ids.image_codes)
    for span in batched:
        assert len(span) == TOKENS + 2 and span[0] == ids.begin_image and span[-1] == ids.end_image
        assert all(t in codes for t in span[1:-1])
    other = sample_image_tokens(model, prompts, ids, TOKENS, seed=7, batch_size=4)
    assert other != batched
    assert len({tuple(s) for s in batched}) == len(batched)  # sampled, not a constant image
    top1 = sample_image_tokens(model, prompts[:2], ids, TOKENS, seed=1, top_k=1)
    assert top1 == sample_image_tokens(model, prompts[:2], ids, TOKENS, seed=2, top_k=1)  # top-1: seed-free
    with pytest.raises(ValueError, match="temperature"):
        sample_image_tokens(model, prompts, ids, TOKENS, temperature=0.0)


def test_sampling_routes_caption_to_t_moe_and_image_tokens_to_v_adapter(tiny):
    base, tokenizer, ids = tiny
    model, _ = build_real_layout_chameleon(SHAPE, vq_resolution=16, seed=0)
    attach_mode(model, MoDEConfig(r=2, num_experts=2), ids)
    prompts = _prompts(tokenizer, ids, CAPTIONS[:3])
    with record_routing(model) as records:
        spans = sample_image_tokens(model, prompts, ids, TOKENS, seed=42, batch_size=3)
    # Untrained adapters (B = 0) leave the model equal to the base one: the same samples.
    assert spans == sample_image_tokens(base, prompts, ids, TOKENS, seed=42, batch_size=3)
    layers = 3 * SHAPE.num_hidden_layers  # gate/up/down per decoder layer
    assert len(records) == layers * TOKENS  # one prompt forward + TOKENS − 1 cached single-token forwards
    width = max(len(p) for p in prompts) + 1
    first = records[0]["image_mask"]
    assert first.shape == (3, width)
    expected = torch.zeros(3, width, dtype=torch.bool)
    expected[:, -1] = True  # begin-image → V-Adapter; caption, <s>, <sep> and left padding → T-MoE
    assert torch.equal(first, expected)
    assert all(torch.equal(r["image_mask"], expected) for r in records[:layers])
    for record in records[layers:]:
        assert record["image_mask"].shape == (3, 1) and bool(record["image_mask"].all())
    # The same routing as the training rule on the full sequence (begin … end-image inclusive).
    for prompt, span in zip(prompts, spans, strict=True):
        full, _ = image_token_mask(torch.tensor([prompt + span]), ids.begin_image, ids.end_image)
        assert full[0].tolist() == [False] * len(prompt) + [True] * len(span)
    # The V-Adapter acts on the sampled tokens: training it changes the images.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "mode_image_B"):
                module.mode_image_B.normal_(0, 5.0)
    assert sample_image_tokens(model, prompts, ids, TOKENS, seed=42, batch_size=3) != spans


# ---------------------------------------------------------------------------------------------- VQGAN


def _write_yaml(path: Path, config: VQGANConfig) -> None:
    ddconfig = {k: v for k, v in config.__dict__.items() if k not in ("embed_dim", "n_embed")}
    ddconfig |= {"ch_mult": list(config.ch_mult), "attn_resolutions": list(config.attn_resolutions)}
    ddconfig |= {"double_z": False, "dropout": 0.0}
    params = {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": ddconfig, "lossconfig": {}}
    path.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}))


def _tiny_clip_dir(root: Path) -> Path:
    """A random CLIPModel with a CLIP tokenizer over byte symbols (no merges) and a PIL image processor."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [*alphabet, *(s + "</w>" for s in alphabet), "<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab_file=str(root / "vocab.json"), merges_file=str(root / "merges.txt"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]}
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, **special)
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77, "pad_token_id": vocab["<|endoftext|>"]}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision |= {"image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    directory = root / "clip"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_image_code_map_follows_the_vocabulary_map(tiny):
    model, _, ids = tiny
    code_map = ImageCodeMap(model.config.vocabulary_map)
    names = {v: k for k, v in model.config.vocabulary_map.items()}
    codes = code_map.codes([list(ids.image_codes[:3]), list(ids.image_codes[-3:])])
    for bpe, code in zip(ids.image_codes[:3] + ids.image_codes[-3:], codes.flatten().tolist(), strict=True):
        digits = "".join(str(ord(c) - ord("A")) for c in names[bpe][len("IMGIMG") : -1])
        assert int(digits) == code
    assert sorted(code_map.codes([list(ids.image_codes)])[0].tolist()) == list(range(8192))
    with pytest.raises(ValueError, match="not an image codebook id"):
        code_map.codes([[ids.begin_image]])


# ---------------------------------------------------------------------------------------------- CLIP


def _coin_data(root: Path, tiny) -> tuple[Path, Path]:
    model, tokenizer, ids = tiny
    model_dir = save_model_dir(model, tokenizer, root / "model")
    sqa = root / "sqa.jsonl"
    record = {"id": "q", "conversations": [{"from": "human", "value": "Which is warm?\nA. ice\nB. sun"}]}
    record["conversations"].append({"from": "gpt", "value": "B"})
    sqa.write_text(json.dumps(record) + "\n")
    codes = ids.image_codes
    stream = [
        {"image_tokens": list(codes[i * 7 : i * 7 + TOKENS]), "caption": f"photo of a thing {i}."} for i in range(8)
    ]
    laion = root / "laion.jsonl"
    laion.write_text("".join(json.dumps(r) + "\n" for r in stream))
    out = root / "data"
    common = ["data", "import-coin", "--model", str(model_dir), "--out", str(out)]
    assert main([*common, "--task", "ScienceQA", "--train", str(sqa), "--test", str(sqa)]) == 0
    assert main([*common, "--generation", str(laion), "--gen-holdout", "0.5"]) == 0
    return model_dir, out


def _run_config(model_dir: Path, data_dir: Path, **coin):
    coin = {"model": str(model_dir), "data_dir": str(data_dir), "max_new_tokens": 2, "eval_batch_size": 2, **coin}
    return load_run_config_dict(
        {"tasks": ["ScienceQA"], "method": {"name": "mode", "r": 2, "num_experts": 2}, "coin": coin}
    )


def _replace(config, **coin):
    return load_run_config_dict({**config.to_dict(), "coin": {**config.to_dict()["coin"], **coin}})


def test_coin_evaluate_adds_sampled_generation_scores(tmp_path, tiny):
    model, _, _ = tiny
    model_dir, data_dir = _coin_data(tmp_path, tiny)
    torch.manual_seed(2)
    decoder = VQGANDecoder(TINY)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(tmp_path / "vqgan.safetensors"))
    _write_yaml(tmp_path / "vqgan.yaml", TINY)
    clip_dir = _tiny_clip_dir(tmp_path)
    plain = _run_config(model_dir, data_dir)
    _, scores = CoinBenchmark(plain, model.config, log=lambda *_: None).evaluate(model, 0)
    assert set(scores) == {"accuracy", "frechet", "nll"} and math.isnan(scores["frechet"])

    config = _run_config(model_dir, data_dir, vqgan=str(tmp_path / "vqgan.safetensors"), clip_model=str(clip_dir))
    config = _replace(config, t2i_prompts=3)
    bench = CoinBenchmark(config, model.config, log=lambda *_: None)
    _, scores = bench.evaluate(model, 0)
    assert {"accuracy", "nll", "frechet", "text_align", "image_align", "fd_clip"} == set(scores)
    assert all(math.isfinite(scores[k]) for k in ("text_align", "image_align", "fd_clip"))
    assert scores["frechet"] == scores["fd_clip"]
    assert len(bench._t2i["reference"]) == 4  # the 4 held-out images, reconstructed by the VQGAN
    _, again = bench.evaluate(model, 1)
    assert again == scores  # seeded sampling: the same model scores the same
    # Sampled spans decode: the prompts are the held-out captions' `<s> caption <sep>` prefixes.
    rows, starts = bench._generation_columns("input_ids", "answer_start")
    spans = sample_image_tokens(model, [rows[0][: starts[0]]], bench.ids, TOKENS)
    images = bench._t2i["decoder"].decode(bench._t2i["code_map"].codes(span_codes(spans, bench.ids, TOKENS)))
    assert images.shape == (1, 3, 16, 16)
    # Reference images from a directory instead.
    from PIL import Image

    references = tmp_path / "refs"
    references.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 60 * i, np.uint8)).save(references / f"{i}.png")
    with_refs = _replace(config, reference_images=str(references))
    bench = CoinBenchmark(with_refs, model.config, log=lambda *_: None)
    _, scores = bench.evaluate(model, 0)
    assert len(bench._t2i["reference"]) == 3 and math.isfinite(scores["image_align"])


def test_t2i_config_validation_and_hash(tmp_path):
    base = {"model": "m", "data_dir": str(tmp_path)}
    plain = _run_config(Path("m"), tmp_path)
    assert "vqgan" not in plain.to_dict()["coin"]  # off: earlier CoIN configs keep their hash
    on = _run_config(Path("m"), tmp_path, vqgan="v.ckpt", clip_model="openai/clip-vit-base-patch32")
    assert on.to_dict()["coin"]["t2i_prompts"] == 101 and on.config_hash() != plain.config_hash()
    assert load_run_config_dict(on.to_dict()).config_hash() == on.config_hash()
    bad = [
        ({"vqgan": "v.ckpt"}, "clip_model is not set"),
        ({"clip_model": "c"}, "vqgan is not set"),
        ({"reference_images": "refs"}, "reference_images"),
        ({"vqgan": "v", "clip_model": "c", "t2i_temperature": 0}, "t2i_temperature"),
        ({"vqgan": "v", "clip_model": "c", "t2i_top_k": 0}, "t2i_top_k"),
        ({"vqgan": "v", "clip_model": "c", "t2i_prompts": 0}, "t2i_prompts"),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message) as error:
            load_run_config_dict({"tasks": ["A"], "coin": {**base, **overrides}})
        assert "\n" not in str(error.value)
