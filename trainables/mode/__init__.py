"""MoDE: modality-decoupled experts (T-MoE on text tokens, V-Adapter on image tokens).

from trainables.mode import MoDEConfig, attach_mode, teacher_mode, route_as, save_mode, load_mode
model = attach_mode(model, MoDEConfig(r=8, num_experts=4))
"""

from trainables.mode.config import MoDEConfig
from trainables.mode.io import load_mode, mode_state_dict, save_mode
from trainables.mode.layer import MoDELinear
from trainables.mode.model import attach_mode, mode_layers, record_routing, route_as, routing_state, teacher_mode
from trainables.mode.routing import image_token_mask

__all__ = [
    "MoDEConfig",
    "MoDELinear",
    "attach_mode",
    "image_token_mask",
    "load_mode",
    "mode_layers",
    "mode_state_dict",
    "record_routing",
    "route_as",
    "routing_state",
    "save_mode",
    "teacher_mode",
]
