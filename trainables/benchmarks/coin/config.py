"""The CoIN benchmark's settings (the ``coin`` section of a run config)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from trainables.config_rules import check_fields, setting


def _chameleon() -> ModuleType:
    # Imported when a value is checked: the module pulls in transformers.
    return importlib.import_module("trainables.benchmarks.coin.chameleon")


@dataclass(frozen=True)
class CoinConfig:
    """The real-scale benchmark: a Chameleon/Anole checkpoint and CoIN data imported by
    ``mode-cl data import-coin``. Its presence in a run config selects this benchmark instead of
    the embedded digits one (``tasks`` then name imported CoIN tasks).

    Args:
        model: checkpoint directory or Hugging Face model id (the HF cache is used when present).
        data_dir: output directory of ``mode-cl data import-coin``.
        dtype / attn_implementation: how the frozen base model is loaded (bf16, ``sdpa`` by default).
        gradient_checkpointing: recompute decoder layers in backward (MoDE routing is replayed).
        max_length: sequences are cut to this many tokens (the paper's 2,048).
        max_new_tokens: greedy answer length limit at evaluation (the paper's 60).
        eval_limit: evaluate at most this many test samples per task (null = all).
        eval_batch_size: prompts per batch during greedy decoding and image-token scoring.
        separator_token: vocabulary-map name of the prompt/answer separator (Chameleon's end of turn).
        vqgan: Chameleon's VQGAN tokenizer checkpoint (``tokenizer/vqgan.ckpt``, or the ``.safetensors``
            written by ``trainables.benchmarks.coin.vqgan.convert_vqgan_checkpoint``); its ``vqgan.yaml`` is
            read when next to it. With ``clip_model`` it turns on sampled text-to-image scoring (see
            ``trainables.benchmarks.coin.benchmark``).
        clip_model: CLIP model directory or Hugging Face id already in the local cache
            (e.g. ``openai/clip-vit-base-patch32``, the paper's ViT-B/32); set together with ``vqgan``.
        reference_images: directory of real reference images for ``image_align`` / ``fd_clip``;
            null = the VQGAN reconstructions of the held-out generation images.
        t2i_prompts: sample images for at most this many held-out generation captions (the paper: 101).
        t2i_temperature / t2i_top_k: sampling temperature (> 0) and optional top-k over the codebook.
        t2i_seed: sampling seed (each prompt has its own generator; the paper's 42).
    """

    model: str = "leloy/Anole-7b-v0.1-hf"
    data_dir: str = "mode-cl-work/coin"
    dtype: str = setting("bfloat16", choices=lambda: _chameleon().DTYPES)
    attn_implementation: str = setting("sdpa", choices=lambda: _chameleon().ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = True
    max_length: int = setting(2048, gt=0)
    max_new_tokens: int = setting(60, gt=0)
    eval_limit: int | None = setting(None, gt=0)
    eval_batch_size: int = setting(8, gt=0)
    separator_token: str = "<reserved08706>"
    vqgan: str | None = None
    clip_model: str | None = None
    reference_images: str | None = None
    t2i_prompts: int = setting(101, gt=0)
    t2i_temperature: float = setting(1.0, gt=0)  # greedy sampling (0) gives blank images
    t2i_top_k: int | None = setting(None, gt=0)
    t2i_seed: int = setting(42, ge=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.vqgan is None) != (self.clip_model is None):
            missing = "clip_model" if self.clip_model is None else "vqgan"
            raise ValueError(
                f"{missing} is not set: sampled image-generation scores need both vqgan (Chameleon's "
                "tokenizer/vqgan.ckpt) and clip_model (e.g. openai/clip-vit-base-patch32); set both or neither"
            )
        if self.reference_images is not None and self.vqgan is None:
            raise ValueError("reference_images is set but vqgan/clip_model are not; set them or drop reference_images")


# CoinConfig fields of sampled text-to-image scoring, left out of RunConfig.to_dict() while it is off.
T2I_FIELDS = ("vqgan", "clip_model", "reference_images", "t2i_prompts", "t2i_temperature", "t2i_top_k", "t2i_seed")
