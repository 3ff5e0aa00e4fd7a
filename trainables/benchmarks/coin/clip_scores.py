"""CLIP scores of generated images, as the paper's inter-modal columns.

- ``text_align`` ↑ — mean cosine similarity between the CLIP embedding of each generated image and
  the CLIP text embedding of its own prompt (raw cosine, so ≈ 0.2–0.3 for a ViT-B/32, as the
  paper's 0.26).
- ``image_align`` ↑ — for each generated image, its mean cosine similarity to *every* reference
  image, averaged over the generated images (the official code's definition, not matched pairs).
- ``fd_clip`` ↓ — the Fréchet distance between Gaussians fitted to the CLIP image embeddings
  (unit-normalised) of the generated and the reference images. This is **not** the Inception FID
  the paper reports: that needs the Inception-v3 weights, which we do not ship. Values are on a
  different scale (CLIP embeddings are unit vectors); compare runs only with each other.

The CLIP model (``transformers.CLIPModel`` + its processor) is read from a local directory or the
Hugging Face cache only; nothing is downloaded during evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainables.errors import UserError


class ClipModelError(UserError, ValueError):
    """The CLIP model cannot be loaded; the message is one line naming it and the fix."""


def gaussian_frechet(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance between N(μ_a, Σ_a) and N(μ_b, Σ_b):
    ‖μ_a − μ_b‖² + Tr Σ_a + Tr Σ_b − 2 Tr (Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2}.

    The trace term is computed from symmetric eigendecompositions (no complex round-off, stable for
    the singular covariances of few samples in many dimensions). In 1-D it is
    (μ_a − μ_b)² + σ_a² + σ_b² − 2 σ_a σ_b."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    values, vectors = np.linalg.eigh((cov_a + cov_a.T) / 2)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)
    return max(distance, 0.0)


def fd_clip(generated: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets ``[N, D]`` (NaN when either
    has fewer than 2 rows: no covariance). Not Inception FID: see the module docstring."""
    a = np.asarray(torch.as_tensor(generated).double().cpu(), dtype=np.float64)
    b = np.asarray(torch.as_tensor(reference).double().cpu(), dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fd_clip: expected [N, D] embeddings of equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return gaussian_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def text_alignment(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean cosine between row ``i`` of the image and of the text embeddings (matched pairs)."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"text_alignment: {tuple(image_embeddings.shape)} vs {tuple(text_embeddings.shape)}")
    return float(F.cosine_similarity(image_embeddings.float(), text_embeddings.float(), dim=-1).mean())


def image_alignment(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over generated images of their mean cosine to every reference image."""
    a = F.normalize(generated.float(), dim=-1)
    b = F.normalize(reference.float(), dim=-1)
    return float((a @ b.T).mean())


def to_pil(images: torch.Tensor) -> list:
    """Float images ``[B, 3, H, W]`` in [0, 1] → RGB PIL images (8-bit, as saved PNGs)."""
    from PIL import Image

    array = images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), "RGB") for a in array]


def _features(output) -> torch.Tensor:
    # transformers ≥ 5 returns a model output whose pooler_output is the projected embedding.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipScorer:
    """A ``CLIPModel`` and its processor from a local directory or the HF cache (never downloaded)."""

    def __init__(self, source: str, device: torch.device | str = "cpu", batch_size: int = 16) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.source, self.device, self.batch_size = source, torch.device(device), batch_size
        try:
            self.model = (
                CLIPModel.from_pretrained(source, local_files_only=True, use_kernels=False)
                .float()
                .to(self.device)
                .eval()
            )
            self.processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
            hint = "the directory" if Path(source).expanduser().exists() else f"run `hf download {source}` first"
            raise ClipModelError(
                f"clip_model: cannot load a CLIP model and processor from {source!r} ({reason}); "
                f"pass a local directory saved by CLIPModel/CLIPProcessor.save_pretrained or {hint}"
            ) from None
        self.max_text_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor | Sequence) -> torch.Tensor:
        """Unit-norm CLIP embeddings ``[N, D]`` (fp32, CPU) of float images ``[N, 3, H, W]`` in [0, 1]
        or PIL images (each resized and cropped by the CLIP processor)."""
        pil = to_pil(images) if isinstance(images, torch.Tensor) else list(images)
        out = []
        for start in range(0, len(pil), self.batch_size):
            pixels = self.processor(images=pil[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))).float().cpu())
        return F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings ``[N, D]`` (texts cut to CLIP's context length)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_text_length,
                return_tensors="pt",
            )
            batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            out.append(_features(self.model.get_text_features(**batch)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1) if out else torch.empty(0, self.model.config.projection_dim)

    def scores(self, generated: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor) -> dict[str, float]:
        """``text_align``, ``image_align`` and ``fd_clip`` of generated images (their embeddings from
        :meth:`image_embeddings`, one per prompt) against reference image embeddings."""
        if len(generated) != len(prompts):
            raise ValueError(f"{len(generated)} generated images for {len(prompts)} prompts")
        nan = float("nan")
        return {
            "text_align": text_alignment(generated, self.text_embeddings(prompts)) if len(prompts) else nan,
            "image_align": image_alignment(generated, reference) if len(reference) and len(generated) else nan,
            "fd_clip": fd_clip(generated, reference),
        }


def load_reference_images(directory: str | Path) -> list:
    """RGB PIL images of every ``.png``/``.jpg``/``.jpeg``/``.webp`` file in ``directory`` (sorted)."""
    from PIL import Image

    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise ValueError(f"reference_images: {directory} is not a directory of reference images")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise ValueError(f"reference_images: {directory} holds no .png/.jpg/.jpeg/.webp images")
    images = []
    for path in files:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
