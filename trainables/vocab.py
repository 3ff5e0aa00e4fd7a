"""Token ids that MoDE needs, read from a Chameleon-style ``vocabulary_map`` and never hard-coded.

A Chameleon vocabulary names its image codebook entries ``IMGIMG<letters>Z`` (the code index
written with the letters A–J for the digits 0–9), begin-image ``<racm3:break>`` and end-image
``<eoss>``. The prompt/answer separator has no fixed name across checkpoints, so it is a
parameter (our tiny vocabulary calls it ``<sep>``) that only data and losses need: MoDE's routing
reads :class:`ImageTokenIds` alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

IMAGE_CODE_PREFIX = "IMGIMG"
BEGIN_IMAGE = "<racm3:break>"
END_IMAGE = "<eoss>"
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SEPARATOR = "<sep>"


def image_code_name(code: int) -> str:
    """Name of codebook entry ``code`` in Chameleon's convention (e.g. 12 -> ``IMGIMGBCZ``)."""
    return IMAGE_CODE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def make_vocabulary_map(words: Sequence[str], num_image_codes: int) -> dict[str, int]:
    """Specials first (as in Chameleon: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2), then the image codebook,
    end-/begin-image, the ``<image>`` placeholder, the separator, then ``words``."""
    if num_image_codes <= 0:
        raise ValueError(f"num_image_codes must be positive, got {num_image_codes}")
    names = list(SPECIAL_TOKENS)
    names += [image_code_name(code) for code in range(num_image_codes)]
    names += [END_IMAGE, BEGIN_IMAGE, IMAGE_PLACEHOLDER, DEFAULT_SEPARATOR]
    duplicates = sorted(set(words) & set(names)) or sorted({w for w in words if list(words).count(w) > 1})
    if duplicates:
        raise ValueError(f"words clash with each other or with special tokens: {duplicates}")
    names += list(words)
    return {name: index for index, name in enumerate(names)}


@dataclass(frozen=True)
class ImageTokenIds:
    """The ids MoDE's routing needs: what opens and closes an image span, and the codebook.

    Attributes:
        begin_image / end_image: ids that open and close an image span (both count as image tokens).
        image_codes: sorted ids of the image codebook entries.
        vocab_size: size of the model's output layer.
    """

    begin_image: int
    end_image: int
    image_codes: tuple[int, ...]
    vocab_size: int

    @classmethod
    def from_vocabulary_map(cls, vocabulary_map: Mapping[str, int], vocab_size: int | None = None) -> ImageTokenIds:
        return cls(**_image_fields(vocabulary_map, vocab_size))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ImageTokenIds:
        """Read the ids from ``model.config`` (unwrapping peft wrappers)."""
        config = find_config(model)
        return cls.from_vocabulary_map(config.vocabulary_map, vocab_size=config.vocab_size)

    def codebook_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[vocab_size]``, True on image codebook ids only."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
        mask[list(self.image_codes)] = True
        return mask

    def image_vocab_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[vocab_size]``, True on codebook ids plus begin/end-image: what an image span can hold."""
        mask = self.codebook_mask(device)
        mask[[self.begin_image, self.end_image]] = True
        return mask


@dataclass(frozen=True, kw_only=True)
class TokenIds(ImageTokenIds):
    """The image ids plus those that data and losses need.

    Attributes:
        separator: id after which the answer starts; everything up to and including it is prompt.
        pad / bos / eos: padding, begin- and end-of-sequence.
        image_placeholder: CoIN's ``<image>`` marker, when the vocabulary has one.
    """

    separator: int
    pad: int
    bos: int
    eos: int
    image_placeholder: int | None = None

    @classmethod
    def from_vocabulary_map(
        cls,
        vocabulary_map: Mapping[str, int],
        vocab_size: int | None = None,
        separator: str = DEFAULT_SEPARATOR,
        pad: str = "<pad>",
        bos: str = "<s>",
        eos: str = "</s>",
    ) -> TokenIds:
        image = _image_fields(vocabulary_map, vocab_size)
        return cls(
            **image,
            separator=_lookup(vocabulary_map, separator, "separator"),
            pad=_lookup(vocabulary_map, pad, "pad"),
            bos=_lookup(vocabulary_map, bos, "bos"),
            eos=_lookup(vocabulary_map, eos, "eos"),
            image_placeholder=vocabulary_map.get(IMAGE_PLACEHOLDER),
        )

    @classmethod
    def from_model(cls, model: torch.nn.Module, **names: str) -> TokenIds:
        """Read the ids from ``model.config`` (unwrapping peft wrappers)."""
        config = find_config(model)
        return cls.from_vocabulary_map(config.vocabulary_map, vocab_size=config.vocab_size, **names)


def _lookup(vocabulary_map: Mapping[str, int], name: str, role: str) -> int:
    if name not in vocabulary_map:
        raise ValueError(
            f"vocabulary_map has no {role} token {name!r}; pass the name your checkpoint uses "
            f"(e.g. TokenIds.from_vocabulary_map(..., {role}='...'))"
        )
    return int(vocabulary_map[name])


def _image_fields(vocabulary_map: Mapping[str, int], vocab_size: int | None) -> dict:
    if not vocabulary_map:
        raise ValueError(
            "model config has no vocabulary_map: MoDE needs it to find image tokens; "
            "use a Chameleon-style config (see trainables.benchmarks.digits.tiny.make_vocabulary_map)"
        )
    codes = tuple(sorted(int(v) for k, v in vocabulary_map.items() if k.startswith(IMAGE_CODE_PREFIX)))
    if not codes:
        raise ValueError(f"vocabulary_map has no image codebook entries (names starting {IMAGE_CODE_PREFIX!r})")
    size = vocab_size if vocab_size is not None else max(vocabulary_map.values()) + 1
    return {
        "begin_image": _lookup(vocabulary_map, BEGIN_IMAGE, "begin_image"),
        "end_image": _lookup(vocabulary_map, END_IMAGE, "end_image"),
        "image_codes": codes,
        "vocab_size": int(size),
    }


def find_config(model: torch.nn.Module):
    """The transformers config of ``model``, looking through peft wrappers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; MoDE needs a Chameleon-style model")
    return config
