"""The digits benchmark's settings: how its data are built (``data``) and its base model (``base``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainables.config_rules import check_fields, setting
from trainables.model_shape import ChameleonShape

MAX_SEQUENCE_TOKENS = 80  # the longest digits sequence: 64 image tokens, a question, an answer and markers
IMAGE_SPAN_TOKENS = 66  # an image span: begin-image, 64 codes, end-image


@dataclass(frozen=True)
class BaseModelConfig:
    """The tiny Chameleon pretrained on the base capabilities: naming the digit, yes/no questions
    about which digit it is, and drawing it (see ``base_model``)."""

    hidden_size: int = setting(128, gt=0)
    intermediate_size: int = setting(344, gt=0)
    num_hidden_layers: int = setting(4, gt=0)
    num_attention_heads: int = setting(4, gt=0)
    epochs: int = setting(6, gt=0)
    lr: float = setting(2e-3, gt=0)
    batch_size: int = setting(32, gt=0)
    seed: int | None = setting(None, ge=0)  # initialisation and data order; None: the run's seed

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def shape(self) -> ChameleonShape:
        return ChameleonShape(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=256,  # digits sequences are at most MAX_SEQUENCE_TOKENS
        )


@dataclass(frozen=True)
class DigitsConfig:
    """How the benchmark is built. Changing any field changes the data hash."""

    seed: int | None = setting(None, ge=0)  # split and sampling; None: the run's seed, so seeds vary the data
    levels: int = setting(8, gt=0)  # grey levels = image codebook size
    test_images: int = setting(397, gt=0)
    task_train: int = setting(400, gt=0)  # samples per continual task from the train images, half of them answered yes
    task_test: int = setting(200, gt=0)  # samples per continual task, drawn from the test images

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict:
        return asdict(self)
