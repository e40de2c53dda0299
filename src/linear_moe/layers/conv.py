"""`ShortConvolution`: the depthwise causal convolution over time that many mixers put on q/k/v, with an explicit
state (the last W-1 inputs)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linear_moe.ops import varlen
from linear_moe.ops.conv import causal_conv1d, conv1d_with_context


class ShortConvolution(nn.Module):
    """Depthwise causal 1-D convolution over time (`kernel_size` taps) with an explicit state.

    forward(x [B, T, D], state [B, D, W-1] | None, cu_seqlens, output_final_state) -> (y [B, T, D], new_state
    [B, D, W-1] or None). The state holds the last W-1 inputs; with cu_seqlens each document starts from its own
    state row (zeros if none) and the convolution never reads across a document boundary. Without a state the
    convolution is `linear_moe.ops.conv.causal_conv1d` (fla's kernel on CUDA). With fla's `cp_context` (context
    parallelism) fla's kernel brings in the previous rank's last W-1 inputs itself; no state goes in or out.
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
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_final_state: bool = True,
        cp_context: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cp_context is not None:
            if state is not None or output_final_state:
                raise ValueError(
                    "ShortConvolution: fla's cp_context carries no state; pass state=None, output_final_state=False"
                )
            return causal_conv1d(x, self.weight, self.bias, self.activation, cu_seqlens, cp_context=cp_context), None
        if state is None:
            y = causal_conv1d(x, self.weight, self.bias, self.activation, cu_seqlens)
            return y, (self._final_state(x, cu_seqlens) if output_final_state else None)
        if cu_seqlens is not None:
            y, new_state = self._batched(varlen.pad(x, cu_seqlens), state, varlen.seq_lens(cu_seqlens))
            return varlen.unpad(y, cu_seqlens), new_state
        return self._batched(x, state, None)

    def _inputs(self, x_BTD: torch.Tensor, state_BDW: torch.Tensor | None) -> torch.Tensor:
        """[B, D, W-1+T]: the carried inputs (zeros without a state) followed by x."""
        B, T, D = x_BTD.shape
        if state_BDW is None:
            state_BDW = x_BTD.new_zeros(B, D, self.kernel_size - 1)
        return torch.cat([state_BDW.to(x_BTD.dtype), x_BTD.transpose(1, 2)], dim=-1)

    def _final_state(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        """The last W-1 inputs of each sequence (of each document with cu_seqlens) started without a state,
        [B or N, D, W-1]."""
        lens_B = None
        if cu_seqlens is not None:
            x, lens_B = varlen.pad(x, cu_seqlens), varlen.seq_lens(cu_seqlens)
        return self._tail(self._inputs(x, None), lens_B)

    def _tail(self, xs_BDT: torch.Tensor, lens_B: torch.Tensor | None) -> torch.Tensor:
        B, D, _ = xs_BDT.shape
        W = self.kernel_size
        if lens_B is None:
            return xs_BDT[..., xs_BDT.shape[-1] - (W - 1) :].contiguous()
        idx_BW = lens_B[:, None] + torch.arange(W - 1, device=xs_BDT.device)  # positions in xs
        return xs_BDT.gather(-1, idx_BW[:, None, :].expand(B, D, W - 1)).contiguous()

    def _batched(
        self, x_BTD: torch.Tensor, state_BDW: torch.Tensor | None, lens_B: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs_BDT = self._inputs(x_BTD, state_BDW)  # [B, D, W-1+T]
        return conv1d_with_context(xs_BDT, self.weight, self.bias, self.activation), self._tail(xs_BDT, lens_B)

    def step(self, x_BD: torch.Tensor, state_BDW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step: x [B, D], state [B, D, W-1] -> (y [B, D], new state)."""
        y, new_state = self._batched(x_BD[:, None], state_BDW, None)
        return y[:, 0], new_state
