"""The base UMGM of the embedded benchmark: a tiny Chameleon pretrained to name, recognise and draw digits.

``pretrain_base`` trains it on the base tasks of the train split (naming the digit, "is it
<digit>" yes/no questions and text-to-image: one sample of each per image) and stores it under
``<cache>/base/<key>/``, where the key hashes the base config, the data hash and the code that
defines model, data and losses: any change rebuilds it, anything else reuses it. The directory is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import ChameleonForConditionalGeneration, get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

import trainables
from trainables.batching import SampleSet
from trainables.benchmarks.digits.config import BaseModelConfig
from trainables.benchmarks.digits.data import BASE_TASKS, DigitsConfig, data_hash, read_tasks, vocabulary
from trainables.benchmarks.digits.tiny import build_tiny_chameleon
from trainables.losses import task_loss
from trainables.run_context import torch_threads
from trainables.vocab import TokenIds

_CODE_FILES = (
    "benchmarks/digits/tiny.py",
    "benchmarks/digits/base_model.py",
    "losses.py",
    "batching.py",
    "benchmarks/digits/data.py",
    "benchmarks/digits/tokenizers.py",
)


def code_version() -> str:
    root = Path(trainables.__file__).parent
    digest = hashlib.sha256(trainables.__version__.encode())
    for name in _CODE_FILES:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:16]


def base_key(config: BaseModelConfig, data: DigitsConfig) -> str:
    payload = {"base": config.__dict__, "data_hash": data_hash(data), "code": code_version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_base(
    config: BaseModelConfig, data: DigitsConfig, task_file: Path, cache_dir: Path, show_progress: bool = True
) -> Path:
    """Return the directory of the pretrained base model, training it first if it is not cached."""
    target = Path(cache_dir) / "base" / base_key(config, data)
    if (target / "model.safetensors").is_file():
        return target
    vocab = vocabulary(data)
    ids = TokenIds.from_vocabulary_map(vocab)
    seed = 0 if config.seed is None else config.seed
    model = build_tiny_chameleon(vocab, config.shape, seed=seed).train()
    samples = SampleSet.from_table(read_tasks(task_file, list(BASE_TASKS), "train"), ids.pad)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    steps = config.epochs * -(-len(samples) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(0.05 * steps), steps)
    started = time.perf_counter()
    columns = [
        TextColumn("pretraining base"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
    ]
    # One fixed thread count: the same weights whether a sweep's driver or a trial pretrains it.
    with Progress(*columns, disable=not show_progress, transient=False) as progress, torch_threads():
        bar = progress.add_task("base", total=steps, loss="")
        for _ in range(config.epochs):
            for batch in samples.batches(config.batch_size, generator):
                loss = task_loss(model, batch.input_ids, batch.attention_mask, batch.is_generation, ids)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                progress.update(bar, advance=1, loss=f"loss {loss.item():.3f}")
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # concurrent builders do not share it
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    (tmp / "pretrain.json").write_text(
        json.dumps(
            {
                "config": config.__dict__,
                "data_hash": data_hash(data),
                "code": code_version(),
                "seconds": round(time.perf_counter() - started, 1),
                "final_loss": loss.item(),
            },
            indent=2,
        )
    )
    if (target / "model.safetensors").is_file():  # another process finished the same model first
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_base(directory: Path) -> ChameleonForConditionalGeneration:
    # use_kernels=False: from transformers 5.25 on, loading defaults to swapping in layer kernels
    # downloaded from the Hub when on CUDA (network, code we did not pin, other numerics).
    return ChameleonForConditionalGeneration.from_pretrained(directory, use_kernels=False).eval()


# A few-MB model loads in milliseconds: transformers' per-shard progress bars are only noise here.
hf_logging.disable_progress_bar()
