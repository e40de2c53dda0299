"""Mixture-of-experts FFN: `MoEConfig`, `MoELayer` (Mixtral, Qwen2-MoE, DeepSeek-V2/V3 families), `MoEAux`, and the
token dispatchers (`LocalDispatcher`, `AllToAllDispatcher` for expert parallelism).

Shape letters in tensor names (`experts_TK`, `rows_MD`, `w13_EDF`):

    B  batch rows             T  tokens of a call (B * seq_len; the router sees [T, D])
    D  hidden size            F  expert FFN width (w13 holds gate | up: 2F)
    E  routed experts         K  experts per token (top_k); `Tk` = the flat T * K assignments
    N  assignment rows this rank dispatches (T * K, fewer when a capacity drops some), sorted by expert
    M  rows this rank's experts compute (= N without expert parallelism; under it, the rows received from
       every expert-parallel rank), grouped by local expert
    R  expert-parallel ranks  G  expert groups (group-limited routing, device balance)
"""

from linear_moe.moe.all_to_all import AllToAllDispatcher
from linear_moe.moe.config import FAMILIES, MoEConfig, moe_param_counts, moe_preset
from linear_moe.moe.dispatch import LocalDispatcher, TokenDispatcher
from linear_moe.moe.experts import MLP, GroupedExperts, SwiGLU, grouped_matmul
from linear_moe.moe.layer import MoEAux, MoELayer
from linear_moe.moe.router import Router, Routing, route

__all__ = [
    "FAMILIES",
    "MLP",
    "AllToAllDispatcher",
    "GroupedExperts",
    "LocalDispatcher",
    "MoEAux",
    "MoEConfig",
    "MoELayer",
    "Router",
    "Routing",
    "SwiGLU",
    "TokenDispatcher",
    "grouped_matmul",
    "moe_param_counts",
    "moe_preset",
    "route",
]
