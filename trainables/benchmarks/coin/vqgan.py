"""Chameleon's VQGAN decoder: image codes → pixels, for scoring sampled text-to-image generations.

transformers' ``ChameleonVQVAE`` holds the encoder only (the HF checkpoints ship no decoder), so
the decoder is rebuilt here from Meta's tokenizer release (``tokenizer/vqgan.ckpt`` + ``vqgan.yaml``
of Chameleon/Anole): a taming-transformers ``VQModel`` whose decoder half is

    codes → codebook embedding [B, h, w, embed_dim] → post_quant_conv (1×1) → Decoder → RGB in [-1, 1]

The module tree (and so every state-dict key) is taming's, e.g. ``quantize.embedding.weight``,
``post_quant_conv.weight``, ``decoder.up.4.block.0.nin_shortcut.weight``, so the released
checkpoint's tensors load by name (the encoder / ``quant_conv`` / ``loss.*`` tensors are ignored).

Loading never unpickles code: :func:`load_vqgan_decoder` reads a safetensors file, or a ``.ckpt``
with ``torch.load(weights_only=True)``. The released file is a PyTorch-Lightning checkpoint that the
safe loader may refuse; convert it once (this trusts the file, so only do it for Meta's release)::

    python -c "from trainables.benchmarks.coin.vqgan import convert_vqgan_checkpoint as c; \\
        c('tokenizer/vqgan.ckpt', 'tokenizer/vqgan.safetensors')"

Image codes here are VQ indices (0 … n_embed − 1), not the language model's BPE ids; map sampled
BPE ids with :class:`ImageCodeMap` (the vocabulary map's ``IMGIMG*`` names, as transformers'
``ChameleonImageVocabularyMapping``).
"""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import UserError

# What the decoder needs from a VQModel checkpoint (taming key prefixes).
DECODER_PREFIXES = ("quantize.embedding.", "post_quant_conv.", "decoder.")
# What the converter keeps (the whole VQModel minus the training loss/discriminator).
MODEL_PREFIXES = ("encoder.", "quant_conv.", *DECODER_PREFIXES)


class VQGANLoadError(UserError, ValueError):
    """The checkpoint cannot be used; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class VQGANConfig:
    """taming's ``ddconfig`` plus the codebook shape; defaults are Chameleon's ``vqgan.yaml``
    (512-pixel images, 32×32 = 1,024 codes of an 8,192-entry codebook)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    embed_dim: int = 256
    n_embed: int = 8192

    def __post_init__(self) -> None:
        if self.ch % 32 or not self.ch_mult or any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"VQGAN ch must be a multiple of 32 (GroupNorm(32)) and ch_mult positive, got {self}")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"VQGAN resolution {self.resolution} is not divisible by 2^{len(self.ch_mult) - 1}")

    @property
    def latent_side(self) -> int:
        """Codes per image side (32 for Chameleon)."""
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.latent_side**2

    @classmethod
    def from_yaml(cls, path: str | Path) -> VQGANConfig:
        """Read taming's config file (``model.params.{embed_dim, n_embed, ddconfig}``)."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
            params = data.get("model", data).get("params", data)
            ddconfig = dict(params["ddconfig"])
            known = {f.name for f in fields(cls)}
            values: dict[str, Any] = {k: v for k, v in ddconfig.items() if k in known}
            values |= {k: params[k] for k in ("embed_dim", "n_embed") if k in params}
            for key in ("ch_mult", "attn_resolutions"):
                if key in values:
                    values[key] = tuple(int(v) for v in values[key])
            return cls(**values)
        except (OSError, yaml.YAMLError, KeyError, AttributeError, TypeError, ValueError) as error:
            raise VQGANLoadError(f"{path}: not a taming VQGAN config with model.params.ddconfig ({error})") from None


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class _ResnetBlock(nn.Module):
    """GroupNorm → swish → 3×3 conv, twice, plus a 1×1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 at inference
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over the h·w positions, 1×1 convs for q, k, v and the output."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)

        def tokens(conv: nn.Conv2d) -> torch.Tensor:  # [B, 1, h·w, C]
            return conv(h).reshape(batch, channels, height * width).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))  # scale C^-1/2
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class _Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Decoder(nn.Module):
    """taming's ``Decoder``: conv_in → mid (res, attn, res) → ``up`` levels from the coarsest
    (``up[len-1]``) to the finest (``up[0]``), each ``num_res_blocks + 1`` res blocks (+ attention at
    ``attn_resolutions``) and a 2× upsample except at level 0 → GroupNorm → swish → conv_out."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        levels = len(config.ch_mult)
        channels = config.ch * config.ch_mult[-1]
        resolution = config.latent_side
        self.conv_in = nn.Conv2d(config.z_channels, channels, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = _ResnetBlock(channels, channels)
        self.mid.attn_1 = _AttnBlock(channels)
        self.mid.block_2 = _ResnetBlock(channels, channels)
        up: list[nn.Module] = [nn.Module() for _ in range(levels)]
        for level in reversed(range(levels)):
            width = config.ch * config.ch_mult[level]
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                blocks.append(_ResnetBlock(channels, width))
                channels = width
                if resolution in config.attn_resolutions:
                    attentions.append(_AttnBlock(channels))
            up[level].block, up[level].attn = blocks, attentions
            if level != 0:
                up[level].upsample = _Upsample(channels)
                resolution *= 2
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(channels)
        self.conv_out = nn.Conv2d(channels, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if level != 0:
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Quantize(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)


class VQGANDecoder(nn.Module):
    """The decoder half of Chameleon's VQGAN with taming's state-dict keys."""

    def __init__(self, config: VQGANConfig | None = None) -> None:
        super().__init__()
        self.config = config or VQGANConfig()
        self.quantize = _Quantize(self.config.n_embed, self.config.embed_dim)
        self.post_quant_conv = nn.Conv2d(self.config.embed_dim, self.config.z_channels, 1)
        self.decoder = _Decoder(self.config)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ indices ``[B, tokens_per_image]`` (row-major over the latent grid) → RGB ``[B, 3, H, W]``
        in [0, 1] (the decoder's [-1, 1] output clamped and rescaled, as Chameleon's image tokenizer)."""
        config = self.config
        if codes.dim() != 2 or codes.shape[1] != config.tokens_per_image:
            raise ValueError(
                f"decode: expected codes of shape [B, {config.tokens_per_image}], got {tuple(codes.shape)}"
            )
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= config.n_embed):
            raise ValueError(
                f"decode: codes must be VQ indices in 0..{config.n_embed - 1} (map BPE ids with ImageCodeMap first)"
            )
        weight = self.quantize.embedding.weight
        side = config.latent_side
        latent = F.embedding(codes.to(weight.device), weight).view(codes.shape[0], side, side, -1)
        pixels = self.decoder(self.post_quant_conv(latent.permute(0, 3, 1, 2).contiguous()))
        return ((pixels.float().clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)


class ImageCodeMap:
    """Language-model BPE ids ↔ VQ codebook indices, read from the vocabulary map exactly as
    transformers' ``ChameleonImageVocabularyMapping`` does (``IMGIMG<letters>Z`` names)."""

    def __init__(self, vocabulary_map: Mapping[str, int]) -> None:
        from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

        bpe2img = ChameleonImageVocabularyMapping(dict(vocabulary_map)).bpe2img
        if not bpe2img:
            raise ValueError("vocabulary_map has no IMGIMG* image codebook entries")
        self.to_code = torch.full((max(bpe2img) + 1,), -1, dtype=torch.long)
        self.to_bpe = torch.full((max(bpe2img.values()) + 1,), -1, dtype=torch.long)
        for bpe, code in bpe2img.items():
            self.to_code[bpe] = code
            self.to_bpe[code] = bpe

    def codes(self, bpe_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """BPE ids ``[B, N]`` → VQ indices ``[B, N]``; raises on any id outside the image codebook."""
        bpe = torch.as_tensor(bpe_ids, dtype=torch.long)
        inside = (bpe >= 0) & (bpe < len(self.to_code))
        codes = torch.where(inside, self.to_code[bpe.clamp(0, len(self.to_code) - 1)], -1)
        if bool((codes < 0).any()):
            bad = bpe[codes < 0][0].item()
            raise ValueError(f"id {bad} is not an image codebook id of the vocabulary map")
        return codes


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise VQGANLoadError(f"{path}: expected a state dict (or a Lightning checkpoint with 'state_dict')")
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_vqgan_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a ``.ckpt``/``.pt`` read with ``weights_only=True``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise VQGANLoadError(f"vqgan: {path} does not exist; point coin.vqgan at Chameleon's tokenizer/vqgan.ckpt")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise VQGANLoadError(
            f"vqgan: {path} holds more than tensors and is refused by the safe loader ({reason}); convert it once "
            "(trusting the file) with: python -c "
            f'"from trainables.benchmarks.coin.vqgan import convert_vqgan_checkpoint as c; '
            f"c('{path}', '{path.with_suffix('.safetensors')}')\" and point coin.vqgan at the .safetensors file"
        ) from None
    return _state_dict_from(obj, path)


def _config_next_to(path: Path) -> VQGANConfig:
    for candidate in (path.with_suffix(".yaml"), path.parent / "vqgan.yaml"):
        if candidate.is_file():
            return VQGANConfig.from_yaml(candidate)
    return VQGANConfig()


def load_vqgan_decoder(
    path: str | Path, config: VQGANConfig | None = None, device: torch.device | str = "cpu"
) -> VQGANDecoder:
    """The decoder from a VQGAN checkpoint (safetensors or a tensors-only torch file), in fp32 and
    eval mode. ``config``: by default the ``.yaml`` of the same name (or ``vqgan.yaml``) next to the
    checkpoint, else Chameleon's shape (:class:`VQGANConfig` defaults)."""
    path = Path(path).expanduser()
    state = read_vqgan_state(path)
    config = config or _config_next_to(path)
    decoder = VQGANDecoder(config)
    wanted = {k: v for k, v in state.items() if k.startswith(DECODER_PREFIXES)}
    own = decoder.state_dict()
    missing = [k for k in own if k not in wanted]
    unexpected = [k for k in wanted if k not in own or wanted[k].shape != own[k].shape]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise VQGANLoadError(
            f"vqgan: {path} does not match the decoder config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected or misshapen tensors, e.g. {example}); put its vqgan.yaml next to it"
        )
    decoder.load_state_dict(wanted)
    bad = next((k for k, v in decoder.state_dict().items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise VQGANLoadError(f"vqgan: {path} has non-finite values in {bad}")
    return decoder.float().to(device).eval()


def convert_vqgan_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Rewrite a taming/Lightning VQGAN checkpoint (e.g. Chameleon's ``tokenizer/vqgan.ckpt``) as a
    safetensors file with only the model tensors (``encoder.``, ``quant_conv.``, ``quantize.``,
    ``post_quant_conv.``, ``decoder.``), and copy its ``.yaml`` next to ``dst`` when there is one.

    WARNING: this unpickles ``src`` with ``torch.load(weights_only=False)``, which can run arbitrary
    code. Call it only on a file you trust (Meta's release, checksum verified); the evaluation itself
    never does this. Needs no part of mode-cl beyond this module (torch + safetensors)."""
    from safetensors.torch import save_file

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    obj = torch.load(src, map_location="cpu", weights_only=False)  # trusted by the caller, see docstring
    state = _state_dict_from(obj, src)
    kept = {k: v.detach().contiguous().clone() for k, v in state.items() if k.startswith(MODEL_PREFIXES)}
    if not any(k.startswith("decoder.") for k in kept):
        raise VQGANLoadError(f"{src}: no decoder.* tensors; is this a taming VQModel checkpoint?")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dst))
    yaml_src = src.with_suffix(".yaml")
    if yaml_src.is_file() and not dst.with_suffix(".yaml").exists():
        shutil.copyfile(yaml_src, dst.with_suffix(".yaml"))
    return dst


__all__ = [
    "ImageCodeMap",
    "VQGANConfig",
    "VQGANDecoder",
    "VQGANLoadError",
    "convert_vqgan_checkpoint",
    "load_vqgan_decoder",
]
