"""Token shift for RWKV-6/7 (arXiv:2404.05892, arXiv:2503.14456): each token sees the previous token.

`token_shift(x, state, cu_seqlens)` returns `delta = x_prev - x` and the new shift state (the last token of each
sequence). With `cu_seqlens` every document's first token reads its own state row (zeros when there is no state),
never the previous document's last token.

It runs in PyTorch everywhere (a subtraction of shifted views; fla's kernel would save nothing worth a dispatch).
Called with fla's `cp_context` (context parallelism) it runs fla's `token_shift_cp`, which brings the previous
rank's last token in through fla's exchange; that form keeps no state.
"""

from __future__ import annotations

import torch

from linear_moe.ops import varlen
from linear_moe.ops._dispatch import Args, FlaCall, fla_dispatch


def token_shift_torch(
    x: torch.Tensor, state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, D], state [N, D] (the token before each sequence; N = B, or the documents with `cu_seqlens`;
    missing means zeros) -> (delta [B, T, D] = x[t-1] - x[t], new state [N, D] = the last token of each sequence).
    An empty document keeps its state row."""
    x_BTD, state_ND = x, state
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


def _stateless(a: Args) -> bool:
    """fla's context-parallel token shift starts every rank from the exchanged token: no state to give it."""
    return a["state"] is None


token_shift = fla_dispatch(
    token_shift_torch,
    # fla reads the local offsets from the context (ours equal them: parallel/cp.py checks the split); it keeps no
    # state, so the new state is None
    FlaCall(
        "modules.token_shift_cp",
        "token_shift_cp",
        ("x", "cu_seqlens"),
        positional=1,
        when=_stateless,
        finish=lambda delta, a: (delta, None),
        drops=("state",),
        cp=True,
        cp_only=True,
    ),
    note="With cp_context: fla's `token_shift_cp` (context parallelism), which returns no state.",
)
