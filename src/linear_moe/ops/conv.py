"""Depthwise causal 1-D convolution over time (the short convolution of DeltaNet, GLA, Mamba2 and others).

`causal_conv1d(x [B, T, D], weight [D, W])` computes y[t] = act(sum_j weight[:, j] * x[t - W + 1 + j] + bias)
with zeros before the start of each sequence (of each document with `cu_seqlens`). On CUDA with fla it runs
fla's Triton kernel; elsewhere `F.conv1d` on padded documents. Carried convolution states (chunked prefill,
decoding) are handled by `linear_moe.layers.conv.ShortConvolution`, which calls this for the stateless case.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops import varlen
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch


def _check(name: str, a: Args) -> None:
    x, weight = a["x"], a["weight"]
    if a["activation"] not in (None, "silu"):
        raise ValueError(f"{name}: activation must be None or 'silu', got {a['activation']!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{name}: expected x [B, T, D] and weight [D, W], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )


@checked(_check)
def causal_conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, T, D], weight [D, W], bias [D] | None, activation None | 'silu' -> y [B, T, D] in x.dtype
    (`F.conv1d` on padded documents)."""
    if cu_seqlens is not None:
        return varlen.unpad(causal_conv1d_torch(varlen.pad(x, cu_seqlens), weight, bias, activation), cu_seqlens)
    return conv1d_with_context(F.pad(x.transpose(1, 2), (weight.shape[1] - 1, 0)), weight, bias, activation)


def _fla_args(a: Args) -> Args:
    x, bias = a["x"], a["bias"]
    return {**a, "weight": a["weight"].to(x.dtype), "bias": None if bias is None else bias.to(x.dtype)}


causal_conv1d = fla_dispatch(
    causal_conv1d_torch,
    FlaCall(
        "modules.causal_conv1d.ops",
        "causal_conv1d",
        ("x", "weight", "bias", "activation", "cu_seqlens"),
        positional=3,
        adapt=_fla_args,
        finish=lambda out, a: out[0],  # fla returns (y, final conv state)
        cp=True,
    ),
    note="Takes fla's cp_context (the previous rank's last W-1 inputs come through fla's exchange).",
)


def conv1d_with_context(
    xs_BDT: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """PyTorch path: xs [B, D, W-1+T] = W-1 context inputs (zeros, or a carried state) then the T inputs ->
    y [B, T, D] (weights cast to xs's dtype)."""
    y_BDT = F.conv1d(
        xs_BDT,
        weight.unsqueeze(1).to(xs_BDT.dtype),
        None if bias is None else bias.to(xs_BDT.dtype),
        groups=xs_BDT.shape[1],
    )
    y_BTD = y_BDT.transpose(1, 2)
    return F.silu(y_BTD) if activation == "silu" else y_BTD
