"""Ablation: T-MoE on text tokens only; image tokens stay on the frozen base weights."""

from trainables.methods.base import MoDEFamily


class TMoEOnly(MoDEFamily):
    NAME = "tmoe_only"
    IMAGE_ADAPTER = False
