"""Pieces shared by several mixers: short causal convolution, RMS norms, output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.ops import varlen


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (computed in at least float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 for half precision; float64 stays float64
        return F.rms_norm(x.to(acc), x.shape[-1:], self.weight.to(acc) if self.weight is not None else None,
                          self.eps).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """`rmsnorm(o) * act(g)`: the output norm + gate used by GLA, RetNet, Mamba2, Gated DeltaNet, HGRN2."""

    def __init__(self, dim: int, eps: float = 1e-6, activation: str = "swish"):
        super().__init__(dim, eps)
        if activation not in ("swish", "sigmoid"):
            raise ValueError(f"GatedRMSNorm: activation must be 'swish' or 'sigmoid', got {activation!r}")
        self.act = F.silu if activation == "swish" else torch.sigmoid

    def forward(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(o) * self.act(g.to(torch.promote_types(g.dtype, torch.float32))).to(o.dtype)


class ShortConvolution(nn.Module):
    """Depthwise causal 1-D convolution over time (`kernel_size` taps) with an explicit state.

    forward(x [B, T, D], state [B, D, W-1] | None, cu_seqlens) -> (y [B, T, D], new_state [B, D, W-1]).
    The state holds the last W-1 inputs; with cu_seqlens each document starts from its own state row
    (zeros if none) and the convolution never reads across a document boundary.
    """

    def __init__(self, dim: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))  # [D, W]
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if activation not in (None, "silu"):
            raise ValueError(f"ShortConvolution: activation must be None or 'silu', got {activation!r}")
        self.activation = activation

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if cu_seqlens is not None:
            lens = varlen.seq_lens(cu_seqlens)
            y, new_state = self._batched(varlen.pad(x, cu_seqlens), state, lens)
            return varlen.unpad(y, cu_seqlens), new_state
        return self._batched(x, state, None)

    def _batched(
        self, x_BTD: torch.Tensor, state_BDW: torch.Tensor | None, lens_B: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x_BTD.shape
        W = self.kernel_size
        if state_BDW is None:
            state_BDW = x_BTD.new_zeros(B, D, W - 1)
        xs_BDT = torch.cat([state_BDW.to(x_BTD.dtype), x_BTD.transpose(1, 2)], dim=-1)  # [B, D, W-1+T]
        y_BDT = F.conv1d(xs_BDT, self.weight.unsqueeze(1).to(x_BTD.dtype), self.bias, groups=D)
        y_BTD = y_BDT.transpose(1, 2)
        if self.activation == "silu":
            y_BTD = F.silu(y_BTD)
        # New state: the last W-1 inputs of each sequence (of each document when padded).
        if lens_B is None:
            new_state = xs_BDT[..., T:]
        else:
            idx_BW = lens_B[:, None] + torch.arange(W - 1, device=x_BTD.device)  # positions in xs
            new_state = xs_BDT.gather(-1, idx_BW[:, None, :].expand(B, D, W - 1))
        return y_BTD, new_state.contiguous()

    def step(self, x_BD: torch.Tensor, state_BDW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x [B, D], state [B, D, W-1] -> (y [B, D], new state)."""
        y, new_state = self._batched(x_BD[:, None], state_BDW, None)
        return y[:, 0], new_state
