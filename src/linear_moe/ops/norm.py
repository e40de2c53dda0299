"""Gated RMS norm `rmsnorm(x) * weight * act(g)`: the output norm of GLA, RetNet, Mamba2, Gated DeltaNet, HGRN2.

On CUDA with fla it runs fla's fused Triton kernel (one read of x and g, one write; the backward recomputes the
normalised value), elsewhere the PyTorch composite below. Both compute in float32 and return `x`'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops._dispatch import fla_module_fn, use_fla

ACTIVATIONS = ("swish", "sigmoid")


def rms_norm_gated(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, activation: str = "swish"
) -> torch.Tensor:
    """x, g [..., D], weight [D] or None -> rmsnorm(x) * weight * act(g) in x.dtype (act: swish or sigmoid)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"rms_norm_gated: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.shape != g.shape:
        raise ValueError(f"rms_norm_gated: x {tuple(x.shape)} and gate g {tuple(g.shape)} must have one shape")
    if use_fla(x) and weight is not None:
        fn = fla_module_fn("norm.fused_norm_gate", "rms_norm_gated")
        return fn(x, g.to(x.dtype), weight, None, activation=activation, eps=eps)
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 for half precision, float64 stays float64
    y = F.rms_norm(x.to(acc), x.shape[-1:], None if weight is None else weight.to(acc), eps)
    g = g.to(acc)
    return (y * (F.silu(g) if activation == "swish" else torch.sigmoid(g))).to(x.dtype)
