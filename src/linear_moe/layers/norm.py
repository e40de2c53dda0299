"""Normalisations shared by the model and the mixers: RMSNorm and the gated RMSNorm used as the output norm of
most linear mixers (`linear_moe.ops.norm.rms_norm_gated`: fla's fused kernel on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.ops.norm import ACTIVATIONS as NORM_ACTIVATIONS
from linear_moe.ops.norm import rms_norm_gated


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (computed in at least float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 for half precision; float64 stays float64
        return F.rms_norm(
            x.to(acc), x.shape[-1:], self.weight.to(acc) if self.weight is not None else None, self.eps
        ).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """`rmsnorm(o) * act(g)`: the output norm + gate used by GLA, RetNet, Mamba2, Gated DeltaNet, HGRN2
    (`linear_moe.ops.norm.rms_norm_gated`: fla's fused kernel on CUDA)."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "swish"):
        super().__init__(dim, eps)
        if activation not in NORM_ACTIVATIONS:
            raise ValueError(f"GatedRMSNorm: activation must be one of {NORM_ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return rms_norm_gated(o, g, self.weight, self.eps, self.activation)
