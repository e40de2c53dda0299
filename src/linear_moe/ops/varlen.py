"""Packed (varlen) sequences for the PyTorch op implementations.

Packed input `[1, T_total, ...]` with offsets `cu_seqlens [N+1]` is turned into a padded batch
`[N, T_max, ...]`, run through the batched op, and packed back. Padding goes at the *end* of each
document and is all zeros; every op keeps its gates in log space, so a zero key/value/gate step
leaves the recurrent state unchanged and the final state of each document is exact.
"""

from __future__ import annotations

import torch


def seq_lens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def varlen_index(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Return (doc_id [T_total], pos_in_doc [T_total], T_max)."""
    lens = seq_lens(cu_seqlens)
    total = int(cu_seqlens[-1])
    doc = torch.repeat_interleave(torch.arange(len(lens), device=cu_seqlens.device), lens, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1][doc]
    return doc, pos, int(lens.max()) if len(lens) else 0


def pad(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[1, T_total, ...]` -> `[N, T_max, ...]`, zero padded at the end of each document."""
    doc, pos, t_max = varlen_index(cu_seqlens)
    out = x.new_zeros(len(cu_seqlens) - 1, t_max, *x.shape[2:])
    out[doc, pos] = x[0]
    return out


def unpad(y: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`[N, T_max, ...]` -> `[1, T_total, ...]` (inverse of `pad`)."""
    doc, pos, _ = varlen_index(cu_seqlens)
    return y[doc, pos].unsqueeze(0)
