"""Gated RMS norm `rmsnorm(x) * weight * act(g)`: the output norm of GLA, RetNet, Mamba2, Gated DeltaNet, HGRN2.

On CUDA with fla it runs fla's fused Triton kernel (one read of x and g, one write; the backward recomputes the
normalised value), elsewhere the PyTorch composite below. Both compute in float32 and return `x`'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch

ACTIVATIONS = ("swish", "sigmoid")


def _check(name: str, a: Args) -> None:
    if a["activation"] not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {a['activation']!r}")
    if a["x"].shape != a["g"].shape:
        raise ValueError(f"{name}: x {tuple(a['x'].shape)} and gate g {tuple(a['g'].shape)} must have one shape")


@checked(_check)
def rms_norm_gated_torch(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, activation: str = "swish"
) -> torch.Tensor:
    """x, g [..., D], weight [D] or None -> rmsnorm(x) * weight * act(g) in x.dtype (act: swish or sigmoid)."""
    acc = torch.promote_types(x.dtype, torch.float32)  # float32 for half precision, float64 stays float64
    y = F.rms_norm(x.to(acc), x.shape[-1:], None if weight is None else weight.to(acc), eps)
    g = g.to(acc)
    return (y * (F.silu(g) if activation == "swish" else torch.sigmoid(g))).to(x.dtype)


rms_norm_gated = fla_dispatch(
    rms_norm_gated_torch,
    FlaCall(
        "modules.norm.fused_norm_gate",
        "rms_norm_gated",
        ("x", "g", "weight", "bias", "activation", "eps"),
        positional=4,
        when=lambda a: a["weight"] is not None,
        adapt=lambda a: {**a, "g": a["g"].to(a["x"].dtype), "bias": None},
    ),
)
