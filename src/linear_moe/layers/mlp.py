"""Dense SwiGLU feed-forward block (the model's dense FFN, the MoE layers' shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from linear_moe.ops.activations import swiglu


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (arXiv:2002.05202): down(silu(gate(x)) * up(x)), [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
