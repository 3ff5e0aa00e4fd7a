"""Resource plan of a run without loading weights (``mode-cl run --dry-run``).

The model is instantiated on the ``meta`` device (shapes only, no memory) from its config: a local
checkpoint's ``config.json``, the Hugging Face cache, or Chameleon-7B's known shape for an uncached
Hub id. The method is attached there too, so parameter counts are exact. GPU memory per worker is an
**estimate** from those counts (formulas in :func:`trainables.adapter_budget.memory_estimate`, the
same that refuses a run too large for this machine's memory), not a measurement.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from trainables.adapter_budget import ModelShape, memory_estimate
from trainables.config import RunConfig
from trainables.methods import build_method
from trainables.vocab import TokenIds

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def resource_plan(config: RunConfig) -> dict[str, Any]:
    """Parameters, adapter parameters, memory estimate per worker and steps per task of ``config``."""
    from transformers import ChameleonForConditionalGeneration

    if config.coin is not None:
        from trainables.benchmarks.coin.chameleon import load_model_config, tokens_per_image

        model_config, source = load_model_config(config.coin.model, "coin.model")
        ids = TokenIds.from_vocabulary_map(
            model_config.vocabulary_map, vocab_size=model_config.vocab_size, separator=config.coin.separator_token
        )
        dtype, seq_len, checkpointing = config.coin.dtype, config.coin.max_length, config.coin.gradient_checkpointing
        stream_len = tokens_per_image(model_config) + 2
    else:
        from trainables.benchmarks.digits.config import IMAGE_SPAN_TOKENS, MAX_SEQUENCE_TOKENS
        from trainables.benchmarks.digits.data import vocabulary
        from trainables.benchmarks.digits.tiny import build_tiny_chameleon

        with torch.device("meta"):
            model_config = build_tiny_chameleon(vocabulary(config.data), config.base.shape).config
        source = "embedded tiny base model"
        ids = TokenIds.from_vocabulary_map(model_config.vocabulary_map, vocab_size=model_config.vocab_size)
        dtype, seq_len, checkpointing, stream_len = "float32", MAX_SEQUENCE_TOKENS, False, IMAGE_SPAN_TOKENS
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(model_config)
    base_params = sum(p.numel() for p in model.parameters())
    vq_params = sum(p.numel() for p in model.model.vqmodel.parameters())
    method = build_method(config.method, ids)
    with torch.device("meta"):
        attached = method.attach(model)
    adapter_params = sum(p.numel() for p in method.trainable_parameters(attached))
    workers = config.resources.num_workers
    micro_batch = max(1, math.ceil(config.train.batch_size / workers))
    shape = ModelShape(
        model_config.hidden_size,
        model_config.intermediate_size,
        model_config.num_hidden_layers,
        model_config.vocab_size,
        int(ids.image_vocab_mask().sum()),
    )
    memory = memory_estimate(
        shape,
        base_params,
        adapter_params,
        _DTYPE_BYTES[dtype],
        micro_batch,
        seq_len,
        stream_len,
        checkpointing,
        method.USES_KD and config.method.kd_weight > 0,
    )
    return {
        "model_source": source,
        "base_params": base_params,
        "vq_params": vq_params,
        "adapter_params": adapter_params,
        "adapter_share": adapter_params / base_params,
        "dtype": dtype,
        "workers": workers,
        "micro_batch_per_worker": micro_batch,
        "global_batch": config.train.batch_size,
        "max_length": seq_len,
        "gradient_checkpointing": checkpointing,
        "memory_gib_per_worker": memory,
        "steps_per_task": steps_per_task(config),
    }


def steps_per_task(config: RunConfig) -> dict[str, int | None]:
    """Optimizer steps per task (None where the data is not imported yet)."""
    batch, epochs = config.train.batch_size, config.train.epochs
    if config.coin is None:
        return {task: epochs * math.ceil(config.data.task_train / batch) for task in config.tasks}
    from pathlib import Path

    from trainables.benchmarks.coin.store import MANIFEST, read_manifest

    manifest = read_manifest(config.coin.data_dir) if (Path(config.coin.data_dir) / MANIFEST).is_file() else {}
    steps: dict[str, int | None] = {}
    for task in config.tasks:
        records = manifest.get("tasks", {}).get(task, {}).get("train", {}).get("records")
        steps[task] = epochs * math.ceil(records / batch) if records else None
    return steps
