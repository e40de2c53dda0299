"""Token shift for RWKV-6/7 (arXiv:2404.05892, arXiv:2503.14456): each token sees the previous token.

`token_shift(x, state, cu_seqlens)` returns `delta = x_prev - x` and the new shift state (the last token
of each sequence). With `cu_seqlens` every document's first token reads its own state row (zeros when
there is no state), never the previous document's last token.
"""

from __future__ import annotations

import torch

from linear_moe.ops import varlen


def token_shift(
    x_BTD: torch.Tensor, state_ND: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (delta [B, T, D] = x[t-1] - x[t], new_state [N, D] = last token of each sequence).

    `state` [N, D] holds the token before each sequence (N = B, or the number of documents with
    `cu_seqlens`); missing means zeros. An empty document keeps its state row.
    """
    B, T, D = x_BTD.shape
    n = B if cu_seqlens is None else len(cu_seqlens) - 1
    if state_ND is None:
        state_ND = x_BTD.new_zeros(n, D)
    state_ND = state_ND.to(x_BTD.dtype)
    if cu_seqlens is None:
        if T == 0:
            return x_BTD.clone(), state_ND
        prev_BTD = torch.cat([state_ND[:, None], x_BTD[:, :-1]], dim=1)
        return prev_BTD - x_BTD, x_BTD[:, -1].contiguous()
    prev_BTD = torch.cat([x_BTD.new_zeros(B, 1, D), x_BTD[:, :-1]], dim=1)
    lens_N = varlen.seq_lens(cu_seqlens)
    nonempty_N = lens_N > 0
    starts = cu_seqlens[:-1][nonempty_N]
    prev_BTD[0, starts] = state_ND[nonempty_N]
    last_ND = x_BTD[0, (cu_seqlens[1:] - 1).clamp(min=0)]
    new_state = torch.where(nonempty_N[:, None], last_ND, state_ND)
    return prev_BTD - x_BTD, new_state.contiguous()
