"""The real-scale model: Anole/Chameleon-7B from a local directory or a Hugging Face model id (cache).

Everything the rest of the code needs (special ids, the image codebook, the VQ tokenizer's
code→BPE mapping) is read from the checkpoint's ``vocabulary_map``. For tests and the GPU check,
:func:`build_real_layout_chameleon` makes random-init models of any size whose vocabulary has the
real checkpoint's layout: 65,536 ids, ``<s>``/``<pad>``/``</s>``/``<unk>`` at 0–3, the 8,192 image
codes ``IMGIMG*`` at 4–8195, ``<eoss>`` (end-image) 8196, ``<racm3:break>`` (begin-image) 8197,
``<reserved08706>`` (the prompt/answer separator MoDE uses) 8710 and ``<image>`` 8711. Their text
tokenizer is a byte-level BPE without merges (one token per UTF-8 byte), so any text encodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonVQVAEConfig

from trainables.errors import UserError
from trainables.model_shape import ChameleonShape
from trainables.vocab import BEGIN_IMAGE, END_IMAGE, IMAGE_PLACEHOLDER, image_code_name

SEPARATOR_TOKEN = "<reserved08706>"  # Chameleon's end-of-turn token; MoDE's answer separator
REAL_VOCAB_SIZE = 65536
REAL_NUM_IMAGE_CODES = 8192
_FIRST_IMAGE_CODE_ID = 4
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")
KNOWN_7B = "chameleon-7b"


class ModelSourceError(UserError, ValueError):
    """The model path/id cannot be used; the message is one line naming it and the fix."""


def _reserved_name(token_id: int) -> str:
    # Chameleon names its reserved tokens by id − 4 (e.g. id 8710 is <reserved08706>).
    return f"<reserved{token_id - _FIRST_IMAGE_CODE_ID:05d}>"


def real_layout_vocabulary_map(text_tokens: Sequence[str] = (), vocab_size: int = REAL_VOCAB_SIZE) -> dict[str, int]:
    """A vocabulary map with the real checkpoint's special-id layout; ``text_tokens`` take the ids
    from 8712 on, every other id is a ``<reservedNNNNN>`` filler."""
    names: dict[int, str] = {0: "<s>", 1: "<pad>", 2: "</s>", 3: "<unk>"}
    for code in range(REAL_NUM_IMAGE_CODES):
        names[_FIRST_IMAGE_CODE_ID + code] = image_code_name(code)
    end_image_id = _FIRST_IMAGE_CODE_ID + REAL_NUM_IMAGE_CODES
    names[end_image_id] = END_IMAGE
    names[end_image_id + 1] = BEGIN_IMAGE
    separator_id = 8710
    names[separator_id + 1] = IMAGE_PLACEHOLDER
    first_text_id = separator_id + 2
    if first_text_id + len(text_tokens) > vocab_size:
        raise ValueError(f"{len(text_tokens)} text tokens do not fit into a vocabulary of {vocab_size}")
    clashes = sorted(set(text_tokens) & {*names.values(), SEPARATOR_TOKEN})
    if clashes or len(set(text_tokens)) != len(text_tokens):
        raise ValueError(f"text tokens must be unique and differ from the special tokens: {clashes}")
    for offset, token in enumerate(text_tokens):
        names[first_text_id + offset] = token
    for token_id in range(vocab_size):
        names.setdefault(token_id, _reserved_name(token_id))
    return {name: token_id for token_id, name in names.items()}


def byte_level_tokenizer(vocabulary_map: dict[str, int]):
    """A fast tokenizer with one token per UTF-8 byte (byte-level BPE, no merges), whose ids come
    from ``vocabulary_map`` (which must contain the 256 byte-level symbols)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ("<s>", "<pad>", "</s>", "<unk>")
    missing = [symbol for symbol in [*alphabet, *specials] if symbol not in vocabulary_map]
    if missing:
        raise ValueError(f"vocabulary_map lacks {len(missing)} byte-level symbols; build it with byte_level_symbols()")
    vocab = {symbol: vocabulary_map[symbol] for symbol in [*alphabet, *specials]}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def byte_level_symbols() -> list[str]:
    """The 256 byte-level symbols, in a fixed order (text tokens of :func:`byte_level_tokenizer`)."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def small_vq_config(resolution: int = 16) -> ChameleonVQVAEConfig:
    """A small VQ-VAE with the real codebook size (8,192 codes): ``resolution``/4 squared image tokens
    (16 → 16 tokens). Channels stay multiples of 32 (GroupNorm(32))."""
    return ChameleonVQVAEConfig(
        embed_dim=8,
        num_embeddings=REAL_NUM_IMAGE_CODES,
        latent_channels=32,
        resolution=resolution,
        base_channels=32,
        channel_multiplier=[1, 1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
    )


def chameleon_7b_config() -> ChameleonConfig:
    """The decoder and VQ shape of Chameleon-7B / Anole-7B (transformers' defaults: hidden 4096,
    MLP 11008, 32 layers, 32 heads, 512-pixel VQ → 1,024 image tokens) with a real-layout vocabulary
    map. For resource planning without weights; the real map's text names are not reproduced."""
    vocabulary_map = real_layout_vocabulary_map()
    return ChameleonConfig(
        vocab_size=REAL_VOCAB_SIZE,
        vocabulary_map=vocabulary_map,
        vq_config=ChameleonVQVAEConfig().to_dict(),
        bos_token_id=vocabulary_map["<s>"],
        pad_token_id=vocabulary_map["<pad>"],
        eos_token_id=vocabulary_map["</s>"],
    )


def build_real_layout_chameleon(
    shape: ChameleonShape | None = None,
    vq_resolution: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[ChameleonForConditionalGeneration, object]:
    """A random-init Chameleon with the real vocabulary layout, and its byte-level tokenizer."""
    vocabulary_map = real_layout_vocabulary_map(byte_level_symbols())
    config = (shape or ChameleonShape()).chameleon_config(vocabulary_map, small_vq_config(vq_resolution))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config).to(dtype)
    return model.eval(), byte_level_tokenizer(vocabulary_map)


def image_processor_for(config: ChameleonConfig):
    """Chameleon's own image preprocessing (PIL backend: no torchvision needed) at the VQ resolution:
    RGB, shortest edge resized, centre crop, scaled to [-1, 1]."""
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    resolution = int(_vq_config(config).resolution)
    return ChameleonImageProcessorPil(
        size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}
    )


def save_model_dir(model: ChameleonForConditionalGeneration, tokenizer, directory: str | Path) -> Path:
    """Write a checkpoint directory laid out like a Hub snapshot (config, weights, tokenizer, image processor)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor_for(model.config).save_pretrained(directory)
    return directory


def _vq_config(config: ChameleonConfig) -> ChameleonVQVAEConfig:
    vq = config.vq_config
    return vq if isinstance(vq, ChameleonVQVAEConfig) else ChameleonVQVAEConfig(**(vq or {}))


def tokens_per_image(config: ChameleonConfig) -> int:
    """Image tokens per image of the model's VQ-VAE (one downsampling per channel-multiplier level
    after the first): 1,024 for the 7B checkpoint's 512-pixel VQ."""
    vq = _vq_config(config)
    return (int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)) ** 2


def looks_like_path(source: str) -> bool:
    """Local paths start with '/', '.', '~' or contain more than one '/' (Hub ids are 'owner/name')."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or Path(source).exists()


def resolve_model_dir(source: str, field: str = "model", allow_download: bool = True) -> Path:
    """A local directory holding ``source``: the path itself, or the Hugging Face cache snapshot of a
    model id (downloaded when missing, unless ``allow_download`` is False or HF_HUB_OFFLINE is set)."""
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise ModelSourceError(
                f"{field}: {source} {what}; pass a Chameleon/Anole checkpoint directory or a Hugging Face model id"
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                source,
                local_files_only=not allow_download,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
            )
        )
    except Exception as error:  # the Hub client raises many types (offline, 404, gated, auth)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSourceError(
            f"{field}: cannot find {source!r} locally or on the Hugging Face Hub ({reason[:160]}); "
            f"pass a local checkpoint directory or run `hf download {source}` first"
        ) from None


def load_model_config(source: str, field: str = "model") -> tuple[ChameleonConfig, str]:
    """The model's config without its weights, and where it came from: a local directory, the
    Hugging Face cache (never downloaded here), or, for an uncached Hub id, Chameleon-7B's known shape."""
    if source == KNOWN_7B:
        return chameleon_7b_config(), "known Chameleon-7B shape"
    if looks_like_path(source):
        directory = resolve_model_dir(source, field)
        return ChameleonConfig.from_pretrained(directory), f"config of {directory}"
    try:
        directory = resolve_model_dir(source, field, allow_download=False)
    except ModelSourceError:
        return chameleon_7b_config(), f"known Chameleon-7B shape ({source} is not in the local Hugging Face cache)"
    return ChameleonConfig.from_pretrained(directory), f"cached config of {source}"


def load_chameleon(
    source: str, dtype: str = "bfloat16", attn_implementation: str = "sdpa", field: str = "model"
) -> ChameleonForConditionalGeneration:
    """``ChameleonForConditionalGeneration`` from a local directory or a Hub id, frozen and in eval mode."""
    if dtype not in DTYPES:
        raise ModelSourceError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelSourceError(
            f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn_implementation!r}"
        )
    directory = resolve_model_dir(source, field)
    config = ChameleonConfig.from_pretrained(directory)
    if not config.vocabulary_map:
        raise ModelSourceError(f"{field}: {source} has no vocabulary_map in its config; MoDE needs it for routing")
    model = ChameleonForConditionalGeneration.from_pretrained(
        directory, dtype=DTYPES[dtype], attn_implementation=attn_implementation, use_kernels=False
    )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def load_tokenizer(source: str | Path, field: str = "model"):
    """The checkpoint's text tokenizer (the real Anole's BPE, or a test model's byte-level one)."""
    from transformers import AutoTokenizer

    directory = resolve_model_dir(str(source), field)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{field}: no usable tokenizer in {directory} ({str(error)[:120]})") from None


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class VQImageTokenizer:
    """Images → BPE token ids with the checkpoint's own VQ-VAE encoder and vocabulary-map mapping,
    as ``ChameleonModel.get_image_tokens`` computes them, wrapped in begin-/end-image.

    Only the VQ-VAE weights are loaded (a few hundred MB for the 7B checkpoint, not the decoder).
    """

    def __init__(self, config: ChameleonConfig, vqmodel, device: torch.device | str = "cpu") -> None:
        from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

        self.config = config
        self.device = torch.device(device)
        self.vqmodel = vqmodel.to(self.device).eval()
        self.mapping = ChameleonImageVocabularyMapping(config.vocabulary_map)
        self.processor = image_processor_for(config)
        vocabulary_map = config.vocabulary_map
        self.begin_image, self.end_image = vocabulary_map[BEGIN_IMAGE], vocabulary_map[END_IMAGE]
        codes = int(_vq_config(config).num_embeddings)
        if len(self.mapping.image_tokens) < codes:
            raise ModelSourceError(
                f"vocabulary_map has {len(self.mapping.image_tokens)} IMGIMG entries but the VQ codebook has {codes}"
            )

    @classmethod
    def from_model_dir(cls, directory: str | Path, device: torch.device | str = "cpu") -> VQImageTokenizer:
        """Load only the ``model.vqmodel.*`` tensors of a checkpoint directory (sharded or not)."""
        import json

        from safetensors import safe_open
        from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

        directory = Path(directory)
        config = ChameleonConfig.from_pretrained(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({file for name, file in weight_map.items() if ".vqmodel." in f".{name}"})
        else:
            files = ["model.safetensors"]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            with safe_open(directory / file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    if name.startswith("model.vqmodel."):
                        state[name.removeprefix("model.vqmodel.")] = handle.get_tensor(name)
        vqmodel = ChameleonVQVAE(_vq_config(config))
        missing, unexpected = vqmodel.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelSourceError(
                f"{directory}: VQ-VAE weights do not match its config ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]})"
            )
        return cls(config, vqmodel.float(), device)

    @torch.no_grad()
    def encode(self, images: Sequence) -> list[list[int]]:
        """PIL images → ``[begin-image, BPE ids…, end-image]`` per image."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        codes = self.vqmodel.encode(pixels.float(), return_dict=True).image_tokens
        bpe = self.mapping.convert_img2bpe(codes).view(len(images), -1).tolist()
        return [[self.begin_image, *row, self.end_image] for row in bpe]
