"""MoDE (full) and its no-distillation ablation."""

from trainables.methods.base import MoDEFamily
from trainables.methods.registry import register_method


@register_method
class MoDE(MoDEFamily):
    """T-MoE on text tokens, V-Adapter on image tokens, KD from the frozen base on the image stream."""

    NAME = "mode"
    USES_KD = True


@register_method
class MoDENoKD(MoDEFamily):
    """MoDE without distillation: the V-Adapter learns from the task CE only."""

    NAME = "mode_no_kd"
