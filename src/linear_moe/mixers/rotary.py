"""Rotary position embedding (RoPE, arXiv:2104.09864), half-split ("rotate_half", GPT-NeoX / Llama / fla) layout.

Positions are explicit: a decoding step passes `positions = cache_len + arange(T)`; packed documents pass
each token's position inside its own document (`varlen.varlen_index(cu_seqlens)[1]`), so RoPE restarts
per document.
"""

from __future__ import annotations

import torch
from torch import nn

from linear_moe.ops import varlen


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE over the first `dim` channels of the head dimension (the rest pass through, as partial rotary).

    forward(x [B, T, H, D], positions [B, T] or [T] (int)) -> x rotated, same shape and dtype.
    Angles are computed in float32 (float64 for float64 input): theta_i = base^(-2i/dim), angle = position * theta_i.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RotaryEmbedding: dim must be a positive even number, got {dim}")
        self.dim, self.base = dim, base

    def forward(self, x_BTHD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Frequencies are made here, not kept as a buffer, so `module.to(bfloat16)` cannot round them.
        acc = torch.promote_types(x_BTHD.dtype, torch.float32)
        inv_freq_F = self.base ** (-torch.arange(0, self.dim, 2, dtype=acc, device=x_BTHD.device) / self.dim)
        pos = positions if positions.dim() == 2 else positions[None]  # [B|1, T]
        angle_BTF = pos.to(acc)[..., None] * inv_freq_F  # [B, T, dim/2]
        angle_BT1R = torch.cat([angle_BTF, angle_BTF], dim=-1)[:, :, None, :]  # [B, T, 1, dim]
        xr, xp = x_BTHD[..., : self.dim], x_BTHD[..., self.dim :]
        xr32 = xr.to(acc)
        out = xr32 * angle_BT1R.cos() + rotate_half(xr32) * angle_BT1R.sin()
        return torch.cat([out.to(x_BTHD.dtype), xp], dim=-1) if xp.shape[-1] else out.to(x_BTHD.dtype)


def token_positions(
    x: torch.Tensor, start: torch.Tensor | None, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of x's tokens and the count after them. `start` [B] (or [N] documents) is the number of tokens
    already seen (None: 0). Returns (positions [B, T] (packed: [1, T_total], restarting per document), end [B|N])."""
    B, T = x.shape[:2]
    if cu_seqlens is None:
        start_B = x.new_zeros(B, dtype=torch.long) if start is None else start.long()
        return start_B[:, None] + torch.arange(T, device=x.device), start_B + T
    doc_T, pos_T, _ = varlen.varlen_index(cu_seqlens)
    lens_N = varlen.seq_lens(cu_seqlens).long()
    start_N = torch.zeros_like(lens_N) if start is None else start.long()
    return (start_N[doc_T] + pos_T)[None], start_N + lens_N
