"""MoELoRA baseline (CoIN): the LoRA-expert mixture on every token, no V-Adapter, no distillation."""

from trainables.methods.base import MoDEFamily
from trainables.methods.registry import register_method


@register_method
class MoELoRA(MoDEFamily):
    NAME = "moelora"
    IMAGE_ADAPTER = False
    EXPERTS_ON_IMAGE_TOKENS = True
