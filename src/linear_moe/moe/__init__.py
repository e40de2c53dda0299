"""Mixture-of-experts FFN: `MoEConfig`, `MoELayer` (Mixtral, Qwen2-MoE, DeepSeek-V2/V3 families), `MoEAux`."""

from linear_moe.moe.config import FAMILIES, MoEConfig, moe_param_counts, moe_preset
from linear_moe.moe.experts import MLP, GroupedExperts, SwiGLU, grouped_matmul
from linear_moe.moe.layer import MoEAux, MoELayer
from linear_moe.moe.router import Router, Routing, route

__all__ = [
    "FAMILIES",
    "MLP",
    "GroupedExperts",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Router",
    "Routing",
    "SwiGLU",
    "grouped_matmul",
    "moe_param_counts",
    "moe_preset",
    "route",
]
