"""MoDE (full) and its no-distillation ablation."""

from trainables.methods.base import MoDEFamily


class MoDE(MoDEFamily):
    """T-MoE on text tokens, V-Adapter on image tokens, KD from the frozen base on the image stream."""

    NAME = "mode"
    USES_KD = True


class MoDENoKD(MoDEFamily):
    """MoDE without distillation: the V-Adapter learns from the task CE only."""

    NAME = "mode_no_kd"
