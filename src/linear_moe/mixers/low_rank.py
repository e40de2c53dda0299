"""Low-rank projection `up(act(down(x)))` used by RWKV-6's decay and RWKV-7's w/a/v/g paths.

Parameter names follow fla (`lora.0.weight`, `lora.2.weight`, `lora.2.bias`) so checkpoints map 1:1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, None: nn.Identity}


class LowRankProjection(nn.Module):
    """x [..., input_dim] -> [..., output_dim] through rank `low_rank_dim` with an activation in between.

    Init as in RWKV: the down projection is zero, the up projection orthogonal with gain 0.1, so a fresh
    projection outputs its bias (set it with `set_bias`).
    """

    def __init__(
        self, input_dim: int, output_dim: int, low_rank_dim: int, bias: bool = True, activation: str | None = "tanh"
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"LowRankProjection: activation must be one of {list(_ACTIVATIONS)}, got {activation!r}")
        self.lora = nn.Sequential(
            nn.Linear(input_dim, low_rank_dim, bias=False),
            _ACTIVATIONS[activation](),
            nn.Linear(low_rank_dim, output_dim, bias=bias),
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        down, up = self.lora[0], self.lora[2]
        nn.init.zeros_(down.weight)
        out_dim, rank = up.weight.shape
        gain = math.sqrt(rank / out_dim) if rank > out_dim else 1.0
        nn.init.orthogonal_(up.weight, gain=0.1 * gain)
        if up.bias is not None:
            nn.init.zeros_(up.bias)

    @torch.no_grad()
    def set_bias(self, value: torch.Tensor | float) -> None:
        self.lora[2].bias.copy_(torch.as_tensor(value, dtype=self.lora[2].bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora(x)
