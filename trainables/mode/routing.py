"""Which tokens are image tokens: computed from ``input_ids`` on every forward, KV-cache aware.

A token is an image token when it is begin-image, or when the last begin-image before it has not
yet been closed by an end-image (so end-image itself is an image token). The rule is evaluated with
cumulative maxima over positions — no Python loop over tokens — and the "inside an open image
span" flag of each row is carried from one cached forward to the next, so a token generated after
begin-image is routed exactly as it would be in the full sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainables.vocab import ImageTokenIds


def image_token_mask(
    input_ids: torch.Tensor, begin_image: int, end_image: int, inside_at_start: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-token mask of ``input_ids`` ``[B, S]`` and each row's open-span flag after the last token.

    Args:
        inside_at_start: bool ``[B]``, True where the row's previous (cached) tokens left an image
            span open. None means the rows start outside any image.
    Returns:
        (mask ``[B, S]`` bool, inside_at_end ``[B]`` bool).
    """
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    never = torch.full_like(positions, -3)
    last_begin = torch.where(input_ids == begin_image, positions, never)
    last_end = torch.where(input_ids == end_image, positions, never)
    # Column 0 is the state before the first token: an open span acts as a begin-image at
    # position -1 with the last end-image at -2; a closed one as the reverse.
    if inside_at_start is None:
        inside_at_start = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    open_at_start = inside_at_start.to(input_ids.device).unsqueeze(1)
    last_begin = torch.cat([torch.where(open_at_start, -1, -2), last_begin], dim=1)
    last_end = torch.cat([torch.where(open_at_start, -2, -1), last_end], dim=1)
    last_begin = last_begin.cummax(dim=1).values  # [B, S+1]: index 0 = state before the first token
    last_end = last_end.cummax(dim=1).values
    inside = last_begin > last_end  # inside[:, t] = span open after consuming t tokens
    mask = inside[:, :-1] | (input_ids == begin_image)
    return mask, inside[:, -1]


@dataclass
class RoutingState:
    """Routing shared by every MoDE layer of one model (one object per attached model).

    ``image_mask`` is set by a forward pre-hook on the decoder before any layer runs. ``teacher``
    bypasses every adapter; ``override`` forces all tokens to one modality or to a given mask.
    """

    token_ids: ImageTokenIds
    teacher: bool = False
    override: str | torch.Tensor | None = None
    image_mask: torch.Tensor | None = None
    inside_at_end: torch.Tensor | None = None
    seen_tokens: int = 0
    # "image" / "text" when every token of the forward is of that modality (known from the
    # override, without reading the mask back from the device); None when mixed or unknown.
    uniform: str | None = None
    recorder: list | None = field(default=None, repr=False)
    # How masks are computed; ``trainables.mode.reference.official_style`` swaps in the per-token loop.
    mask_function: Callable[..., tuple[torch.Tensor, torch.Tensor]] = field(default=image_token_mask, repr=False)
    _text_rows: tuple[torch.Tensor, tuple[int, bool], torch.Tensor] | None = field(default=None, repr=False)

    def text_rows(self) -> torch.Tensor:
        """Flat indices of the current mask's text tokens (``[B·S]`` order), computed once per mask:
        every MoDE layer of a forward gathers the same rows."""
        mask = self.image_mask
        if mask is None:
            raise RuntimeError("no routing mask: the model's forward sets it before any MoDE layer runs")
        if mask.is_inference():
            # An inference tensor keeps no version counter: recompute (cheap, and no backward follows).
            return (~mask).reshape(-1).nonzero().squeeze(-1)
        # Keyed by the mask object, its version (a route_as mask edited in place) and inference
        # mode (indices made there cannot be saved for a later backward).
        state = (mask._version, torch.is_inference_mode_enabled())
        if self._text_rows is None or self._text_rows[0] is not mask or self._text_rows[1] != state:
            self._text_rows = (mask, state, (~mask).reshape(-1).nonzero().squeeze(-1))
        return self._text_rows[2]

    def update(
        self, input_ids: torch.Tensor | None, shape: tuple[int, int], past_length: int, device: torch.device
    ) -> None:
        """Compute the mask for a forward over ``shape`` = (batch, new tokens) after ``past_length`` cached."""
        batch, length = shape
        self.uniform = self.override if isinstance(self.override, str) else None
        if isinstance(self.override, torch.Tensor):
            if tuple(self.override.shape) != (batch, length):
                raise ValueError(
                    f"route_as mask has shape {tuple(self.override.shape)} but the forward has {(batch, length)}"
                )
            self.image_mask = self.override.bool()
            self.inside_at_end = None
            return
        if self.override in ("image", "text"):
            self.image_mask = torch.full((batch, length), self.override == "image", dtype=torch.bool, device=device)
            self.inside_at_end = None
            return
        if input_ids is None:
            raise ValueError(
                "MoDE routes tokens by their ids: call the model with input_ids, or wrap the call in "
                "trainables.mode.route_as(model, 'image' | 'text' | mask)"
            )
        carry = None
        if past_length > 0:
            if self.inside_at_end is None or self.seen_tokens != past_length or self.inside_at_end.shape[0] != batch:
                raise RuntimeError(
                    f"MoDE routing state is out of sync with the KV cache (cache holds {past_length} tokens, "
                    f"routing saw {self.seen_tokens}); run the prompt through the model before decoding from its cache"
                )
            carry = self.inside_at_end
        self.image_mask, self.inside_at_end = self.mask_function(
            input_ids, self.token_ids.begin_image, self.token_ids.end_image, carry
        )
        self.seen_tokens = past_length + length
