"""Tokenizers of the embedded digits benchmark.

Images: scikit-learn's 8×8 digits have integer intensities 0..16. Each pixel is quantised to one
of ``levels`` grey levels (uniform bins over 0..16) and becomes one image token, row-major: 64
tokens per image. Decoding maps a level back to its bin centre. With 8 levels the reconstruction
error on the whole dataset is measured by :func:`reconstruction_error` (see the README table).

Text: a fixed word-level vocabulary (every prompt and answer of the benchmark is built from it).
"""

from __future__ import annotations

import numpy as np

MAX_INTENSITY = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = (
    *DIGIT_WORDS,
    *("what", "digit", "is", "this", "draw", "a", "it", "yes", "no"),
    *("even", "big", "prime", "square", "round", "fibonacci"),
)


class PixelQuantizer:
    """Image ↔ codebook indices by uniform quantisation of the 0..16 intensities."""

    def __init__(self, levels: int = 8) -> None:
        if not 2 <= levels <= MAX_INTENSITY + 1:
            raise ValueError(f"levels must be between 2 and {MAX_INTENSITY + 1}, got {levels}")
        self.levels = levels

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``[N, 8, 8]`` or ``[N, 64]`` intensities → ``[N, 64]`` codes in 0..levels-1."""
        flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        codes = np.floor(flat * self.levels / (MAX_INTENSITY + 1)).astype(np.int64)
        return np.clip(codes, 0, self.levels - 1)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes → intensities ``[N, 64]`` float: the midpoint of the integer intensities in each bin."""
        width = (MAX_INTENSITY + 1) / self.levels
        codes = np.asarray(codes, dtype=np.float64)
        lowest = np.ceil(codes * width)
        highest = np.ceil((codes + 1) * width) - 1
        return (lowest + highest) / 2

    def reconstruction_error(self, images: np.ndarray) -> float:
        """Root-mean-square intensity error of encode → decode (intensity units, range 0..16)."""
        flat = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        return float(np.sqrt(np.mean((self.decode(self.encode(flat)) - flat) ** 2)))


class WordTokenizer:
    """Whitespace word tokenizer over a fixed vocabulary map."""

    def __init__(self, vocabulary_map: dict[str, int]) -> None:
        self.vocabulary_map = vocabulary_map
        self.id_to_word = {i: w for w, i in vocabulary_map.items()}

    def encode(self, text: str) -> list[int]:
        unknown = [w for w in text.split() if w not in self.vocabulary_map]
        if unknown:
            raise ValueError(f"words not in the benchmark vocabulary: {unknown}")
        return [self.vocabulary_map[w] for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.id_to_word.get(i, "<unk>") for i in ids)
