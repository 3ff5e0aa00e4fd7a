"""``MoDELinear``: the math of one adapted linear layer (no model surgery here).

    y = W x                                     (frozen base, always)
      + (α/r) Σ_j g_j(x) B_j A_j drop(x)        for text tokens   (T-MoE, g = softmax(W_g x) in fp32)
      + (α/r) B_v A_v drop(x)                   for image tokens  (V-Adapter)

Training forwards take one of three computations of the same function, on rows ``[B·S, in]``:

- fused (accelerators, and experts on image tokens): all experts and the V-Adapter as one stacked
  product. Their A matrices are stacked into ``[(E+1)·r, in]``, each token's rank-r blocks are
  weighted by its router gate (text tokens) or by 1 (image tokens, V-Adapter block) or by 0 (the
  other modality), and one stacked B ``[out, (E+1)·r]`` maps back. A zero weight makes both the
  output and the gradient of the unused block exactly zero, which is what keeps the modalities'
  parameters decoupled;
- per-modality rows (CPU, mixed batches): the V-Adapter on every row weighted by the image mask,
  the router and experts on the gathered text rows only. Same outputs, gradients and dropout masks
  within float rounding; on CPU the fused product's zero-weighted blocks cost as much as used ones;
- image only (the distillation stream, every token routed to the V-Adapter): the V-Adapter alone.

Where the base is a plain ``nn.Linear`` without hooks, of the adapters' dtype, with autocast off
(CPU fp32), each adds its adapter product into the base layer's output in place (``addmm_``), so
the ``[B·S, out]`` output is written once; otherwise a separate add. The fused product also serves
``route_as(model, "text")`` and batches without text rows. Without autograd,
:meth:`MoDELinear._inference_forward` merges the V-Adapter into the base weight instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from trainables.mode.config import MoDEConfig
from trainables.mode.routing import RoutingState


class InputDropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout``: each element is dropped with probability p′ and the
    others are scaled by 1 / (1 − p′) (rounded to the input's dtype), where p′ = round(p · 2¹⁶) / 2¹⁶,
    p on a grid of 2⁻¹⁶ (|p′ − p| ≤ 2⁻¹⁷ ≈ 7.6e-6; 0.05 becomes 0.0500031), kept within
    [2⁻¹⁶, 1 − 2⁻¹⁶] for 0 < p < 1.

    The keep-mask is drawn the cheap way for the device. On CPU, where the masks were a large share
    of a tiny model's train step, it compares 16-bit random integers, four from every 64-bit
    ``torch.randint`` draw: 0.67 ms for a 1,184 × 344 mask on one thread, against 1.2 ms with
    ``torch.rand`` (a float per element) and 1.9 ms with ``bernoulli_``. Elsewhere it compares an
    fp32 ``torch.rand`` with p′. Both keep an element with probability exactly 1 − p′."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        # p′ · 2¹⁶: how many of a 16-bit draw's values drop
        self.dropped_of_65536 = min(max(round(p * 2**16), 1), 2**16 - 1) if 0 < p < 1 else round(p * 2**16)
        self.scale = 2**16 / (2**16 - self.dropped_of_65536)  # 1 / (1 − p′)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        with torch.no_grad():
            keep = self.keep_mask(x)
        return x * keep

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / (1 − p′)`` where an element is kept and 0 where it is dropped, shaped and typed as ``x``."""
        if x.device.type != "cpu":
            uniform = torch.rand(x.shape, device=x.device)  # fp32 whatever x is: exact 1 − p′
            return uniform.ge_(self.dropped_of_65536 / 2**16).mul_(self.scale).to(x.dtype)
        count = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, (-(-count // 4),), dtype=torch.int64)
        bits = draws.view(torch.int16)[:count].view(x.shape)  # uniform on [-2¹⁵, 2¹⁵)
        # int16 → fp32 is exact and, unlike a bool → float cast, vectorised.
        return bits.to(torch.float32).ge_(self.dropped_of_65536 - 2**15).mul_(self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p} (drops {self.dropped_of_65536}/65536)"


def _runs_hooks(layer: nn.Module) -> bool:
    """Whether calling ``layer`` runs a module hook of its own or a global one
    (``register_module_forward_hook`` and friends): the test torch makes before its hook-free call."""
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def add_product(result: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``result + hidden @ bᵀ`` on rows (``[N, out]``, ``[N, k]``, ``[out, k]``). With ``in_place``
    (``result`` is a fresh tensor that nothing saved for backward reads, e.g. an ``nn.Linear``
    output) and matching dtypes, one ``addmm_`` into ``result``: no second pass over the
    ``[N, out]`` output, forward or backward."""
    if in_place and result.dtype == hidden.dtype == b.dtype and not torch.is_autocast_enabled(result.device.type):
        return result.addmm_(hidden, b.t())
    return result + torch.nn.functional.linear(hidden, b).to(result.dtype)


class MoDELinear(nn.Module):
    """A frozen ``nn.Linear`` plus T-MoE experts, a router and (optionally) a V-Adapter.

    Trainable parameters (names carry the modality, so optimisers and tests can select them):
        mode_text_A ``[E·r, in]``, mode_text_B ``[out, E·r]``, mode_text_router ``[E, in]``,
        mode_image_A ``[r, in]``, mode_image_B ``[out, r]``.
    """

    adapter_parameter_names = ("mode_text_A", "mode_text_B", "mode_text_router", "mode_image_A", "mode_image_B")

    def __init__(self, base_layer: nn.Linear, config: MoDEConfig, routing: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.routing = routing  # shared, not a submodule: one state per model
        r, experts = config.r, config.num_experts
        in_features, out_features = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        # Adapters keep fp32 master weights even on a bf16 base; autocast picks the compute dtype.
        self.mode_text_A = nn.Parameter(torch.empty(experts * r, in_features, device=device))
        self.mode_text_B = nn.Parameter(torch.zeros(out_features, experts * r, device=device))
        self.mode_text_router = nn.Parameter(torch.empty(experts, in_features, device=device))
        if config.image_adapter:
            self.mode_image_A = nn.Parameter(torch.empty(r, in_features, device=device))
            self.mode_image_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.dropout = InputDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """A and router: Kaiming-uniform (as nn.Linear); B: zero, so the layer starts equal to the base."""
        r = self.config.r
        with torch.no_grad():
            for expert in range(self.config.num_experts):
                nn.init.kaiming_uniform_(self.mode_text_A[expert * r : (expert + 1) * r], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.mode_text_router, a=math.sqrt(5))
            self.mode_text_B.zero_()
            if self.config.image_adapter:
                nn.init.kaiming_uniform_(self.mode_image_A, a=math.sqrt(5))
                self.mode_image_B.zero_()

    def router_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Dense softmax over experts, in fp32: ``[..., E]``."""
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would recast the inputs
            logits = torch.nn.functional.linear(x.float(), self.mode_text_router.float())
            return torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.routing
        if state.teacher:
            return self.base_layer(x)
        image_mask = state.image_mask
        if image_mask is None or image_mask.shape != x.shape[:-1]:
            raise RuntimeError(
                "MoDE layer called without a routing mask for this input "
                f"(mask {None if image_mask is None else tuple(image_mask.shape)}, input {tuple(x.shape[:-1])}); "
                "call the model itself, not a submodule, or wrap the call in trainables.mode.route_as(...)"
            )
        if self._inference_ready(x):
            return self._inference_forward(x, image_mask)
        # On rows [B·S, in]: the adapter products are then added into the base output in place
        # (an in-place op on a reshaped view would make autograd copy the gradient back).
        shape, x, image_mask = x.shape, x.reshape(-1, x.shape[-1]), image_mask.reshape(-1)
        result = self.base_layer(x)
        if state.uniform == "image" and not self.config.experts_on_image_tokens:
            result = self._image_only(x, result, image_mask, shape)
        elif self._split_ready(x) and self.routing.text_rows().numel() > 0:
            result = self._split(x, result, image_mask, shape)
        else:
            result = self._fused(x, result, image_mask, shape)
        return result.view(*shape[:-1], result.shape[-1])

    def _fused(self, x: torch.Tensor, result: torch.Tensor, image_mask: torch.Tensor, shape: torch.Size):
        """Every row through the stacked product of all blocks, each weighted per token."""
        r, config = self.config.r, self.config
        gates = self.router_gates(x)  # [N, E], fp32
        image = image_mask.unsqueeze(-1).to(gates.dtype)  # [N, 1]
        text_weight = gates if config.experts_on_image_tokens else gates * (1.0 - image)
        # One weight per rank-r block ([N, E(+1)]), broadcast over the block's r columns below:
        # cheaper than materialising a [N, (E+1)·r] weight, forward and backward. α/r goes in
        # here, onto the blocks, not onto the out-wide delta.
        if config.image_adapter:
            block_weight = torch.cat([text_weight, image], dim=-1)
            a = torch.cat([self.mode_text_A, self.mode_image_A], dim=0)  # [(E+1)·r, in]
            b = torch.cat([self.mode_text_B, self.mode_image_B], dim=1)  # [out, (E+1)·r]
        else:
            block_weight, a, b = text_weight, self.mode_text_A, self.mode_text_B
        blocks = block_weight.shape[-1]
        hidden = torch.nn.functional.linear(self.dropout(x).to(a.dtype), a)  # [N, blocks·r]
        block_weight = (block_weight * config.scaling).to(hidden.dtype).unsqueeze(-1)  # [N, blocks, 1]
        hidden = (hidden.unflatten(-1, (blocks, r)) * block_weight).flatten(-2)
        self._record(image_mask, gates, shape)
        return add_product(result, hidden, b, self._owns_output)

    def _record(self, image_mask: torch.Tensor, gates: torch.Tensor, shape: torch.Size) -> None:
        """Append this call's mask ``[B, S]`` and gates ``[B, S, E]`` to the recorder, if one listens."""
        if self.routing.recorder is not None:
            batch_shape = shape[:-1]
            self.routing.recorder.append(
                {
                    "layer": self,
                    "image_mask": image_mask.detach().view(batch_shape),
                    "gates": gates.detach().view(*batch_shape, gates.shape[-1]),
                }
            )

    def _image_only(
        self, x: torch.Tensor, result: torch.Tensor, image_mask: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        """A forward whose tokens are all image tokens (the distillation stream): the V-Adapter
        alone, rank r instead of (E+1)·r and no router, since the experts' block weights would all
        be 0. Same dropout draw as the fused product, so the same mask."""
        config = self.config
        if self.routing.recorder is not None:
            with torch.no_grad():
                self._record(image_mask, self.router_gates(x), shape)
        dropped = self.dropout(x)
        if not config.image_adapter:
            return result
        hidden = torch.nn.functional.linear(dropped.to(self.mode_image_A.dtype), self.mode_image_A)
        return add_product(result, hidden * config.scaling, self.mode_image_B, self._owns_output)

    @property
    def _owns_output(self) -> bool:
        """Whether the base layer's output may be written in place: a plain ``nn.Linear`` saves its
        input and weight for backward, never its output, unless a hook sees it (a full backward
        hook or backward pre-hook wraps it in a view that refuses in-place writes; a forward hook
        may keep it)."""
        return type(self.base_layer) is nn.Linear and not _runs_hooks(self.base_layer)

    def _split_ready(self, x: torch.Tensor) -> bool:
        """Whether a mixed forward computes each modality's adapter on its own rows: on CPU, where
        the fused product's zero-weighted blocks cost as much as the used ones (the experts' E·r
        columns on every image token, most of a task batch) and a row gather is cheap; experts on
        text tokens only. Not on whether a recorder listens: a checkpointed layer's recompute runs
        without one and must take the path its forward took. A batch without
        text rows takes the fused product, whose zero-weighted experts still get a (zero) gradient,
        which the optimizer's weight decay and momentum act on, as on every other step."""
        return (
            x.device.type == "cpu"
            and not self.config.experts_on_image_tokens
            and self.routing.uniform is None
            # A subclass's router may read per-token state in [B, S] order (CL-MoE's counts).
            and type(self).router_gates is MoDELinear.router_gates
        )

    def _split(
        self, x: torch.Tensor, result: torch.Tensor, image_mask: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        """The fused product's output, each modality's adapter on its own rows: the V-Adapter
        (rank r) on every row, weighted by the image mask, and the router and experts (rank E·r)
        only on the gathered text rows, added to theirs in place. The same dropout draw as the
        fused product, so the same mask; equal to it up to float rounding, gradients included."""
        config, r = self.config, self.config.r
        if self.routing.recorder is not None:  # records hold every token's gates
            with torch.no_grad():
                self._record(image_mask, self.router_gates(x), shape)
        base_output = result
        # One dropout draw, where the fused product draws it: the same mask. An active InputDropout
        # hands over its mask, which the text rows then take from the gathered input below.
        keep = self._keep_mask(x)
        dropped = self.dropout(x) if keep is None else None
        if config.image_adapter:
            image = (image_mask.unsqueeze(-1) * config.scaling).to(self.mode_image_A.dtype)  # [N, 1]
            image_input = x * keep if keep is not None else dropped
            hidden = torch.nn.functional.linear(image_input.to(self.mode_image_A.dtype), self.mode_image_A) * image
            result = add_product(result, hidden, self.mode_image_B, self._owns_output)
        if result is base_output and not self._owns_output:
            result = result.clone()  # written in place below
        text_rows = self.routing.text_rows()
        text_x = x.index_select(0, text_rows)
        gates = self.router_gates(text_x) * config.scaling  # [T, E], fp32
        # The mask's text rows on the gathered input: equal to gathering the dropped input, with
        # one row gather of x to differentiate instead of two (each a zeroed [B·S, in] gradient).
        if keep is not None:
            text = text_x * keep.index_select(0, text_rows)
        else:
            text = text_x if dropped is x else dropped.index_select(0, text_rows)
        text = text.to(self.mode_text_A.dtype)
        hidden = torch.nn.functional.linear(text, self.mode_text_A).unflatten(-1, (config.num_experts, r))
        hidden = (hidden * gates.to(hidden.dtype).unsqueeze(-1)).flatten(-2)
        text_delta = torch.nn.functional.linear(hidden, self.mode_text_B)  # [T, out]
        # In place: nothing saved for backward reads this tensor (the base output or a clone).
        return result.index_add_(0, text_rows, text_delta.to(result.dtype))

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The input dropout's scaled keep-mask for ``x`` when this layer's dropout is an active
        :class:`InputDropout`; otherwise None (no dropout, eval mode, or a replaced dropout module,
        which is then called as it is)."""
        if isinstance(self.dropout, InputDropout) and self.dropout.training:
            with torch.no_grad():
                return self.dropout.keep_mask(x)
        return None

    def _inference_ready(self, x: torch.Tensor) -> bool:
        """Whether the inference path applies: no autograd, no dropout, nothing recorded, experts
        on text tokens only, and a plain fp32 base (merging an adapter into a bf16 weight would round
        it away)."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self.routing.recorder is None
            and not self.config.experts_on_image_tokens
            and type(self.base_layer) is nn.Linear
            and self.base_layer.weight.dtype == torch.float32
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled(x.device.type)
        )

    def _inference_forward(self, x: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
        """The same layer without autograd, at about the base layer's cost.

        Image tokens see a single weight, the base with the V-Adapter merged in
        (``W + (α/r) B_v A_v``; no adapter: ``W``), so the adapter costs nothing per token there.
        Only the text tokens (a few per sequence in evaluation prompts; none while an image is
        decoded) go through the router and the experts, on their own gathered rows. Equal to the
        training forward up to float rounding (merged product vs product of products).
        """
        base, config = self.base_layer, self.config
        weight = base.weight
        if config.image_adapter:
            weight = torch.addmm(weight, self.mode_image_B, self.mode_image_A, alpha=config.scaling)
        result = torch.nn.functional.linear(x, weight, base.bias)
        if self.routing.uniform == "image":
            return result
        text_rows = self.routing.text_rows()
        if text_rows.numel() == 0:
            return result
        text = x.reshape(-1, x.shape[-1]).index_select(0, text_rows)  # [T, in]
        r, experts = config.r, config.num_experts
        gates = self.router_gates(text) * config.scaling  # [T, E]
        hidden = torch.nn.functional.linear(text, self.mode_text_A).unflatten(-1, (experts, r))
        delta = torch.nn.functional.linear((hidden * gates.unsqueeze(-1)).flatten(-2), self.mode_text_B)
        flat = result.reshape(-1, result.shape[-1])
        flat.index_copy_(0, text_rows, base(text) + delta)
        return result

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in={self.base_layer.in_features}, out={self.base_layer.out_features}, r={c.r}, "
            f"experts={c.num_experts}, image_adapter={c.image_adapter}"
        )
