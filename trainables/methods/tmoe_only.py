"""Ablation: T-MoE on text tokens only; image tokens stay on the frozen base weights."""

from trainables.methods.base import MoDEFamily
from trainables.methods.registry import register_method


@register_method
class TMoEOnly(MoDEFamily):
    NAME = "tmoe_only"
    IMAGE_ADAPTER = False
