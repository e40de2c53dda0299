"""RWKV-7 "Goose" (arXiv:2503.14456) as fla's diagonal-plus-low-rank delta rule (`generalized_delta_rule/dplr`):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T,     o_t = scale * r_t^T S_t

state `S [K, V]` per head (the transpose of RWKV's own `[V, K]` convention), `w [B, T, H, K]` the per-channel log
decay (<= 0, typically in [-0.6, 0]), `a` reads the state *before* this token's decay. RWKV-7 layers pass
a = -kk and b = kk * iclr (kk the normalised removal key).

Defaults follow fla 0.6.0 and differ between the two ops: `chunk_rwkv7` has scale=1.0 and
output_final_state=False, `fused_recurrent_rwkv7` has scale=None (K^-0.5) and output_final_state=True.
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _wy, checks
from linear_moe.ops._dispatch import Args, FlaCall, cast_like, checked, fla_dispatch

Tensor = torch.Tensor
CHUNK_SIZE = 64  # shortened where the decays are strong (`_wy.factorised_chunk_size`)
FLA_CHUNK_KWARGS = ("safe_gate", "chunk_size", "disable_recompute", "lower_bound")


def _check(name: str, a: Args) -> None:
    r, v = a["r"], a["v"]
    n = checks.check_qkv(name, r, a["k"], v, a["cu_seqlens"], w=a["w"], a=a["a"], b=a["b"])
    checks.check_state(name, a["initial_state"], n, r.shape[2], r.shape[3], v.shape[3])


@checked(_check)
def chunk_rwkv7_torch(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked generalized-WY form. r, w, k, a, b `[B, T, H, K]`, v `[B, T, H, V]`,
    initial_state `[N, H, K, V]` -> o `[B, T, H, V]` (v's dtype), final state `[N, H, K, V]` (float32) or None.
    fla's kernel-tuning kwargs (safe_gate, disable_recompute, lower_bound) are ignored; chunk_size is an upper bound
    (halved while a chunk would span more than e^40 of decay: `_wy.factorised_chunk_size`)."""
    return _wy.run_dplr(
        _wy.chunk_dplr,
        r,
        k,
        v,
        a,
        b,
        w,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
        a_pre_decay=True,
    )


@checked(_check)
def fused_recurrent_rwkv7_torch(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path); shapes as `chunk_rwkv7_torch`; scale None means K^-0.5."""
    scale = r.shape[-1] ** -0.5 if scale is None else scale
    return _wy.run_dplr(
        _wy.recurrent_dplr, r, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens, a_pre_decay=True
    )


ARGS = ("r", "w", "k", "v", "a", "b", "scale", "initial_state", "output_final_state", "cu_seqlens")
CAST = cast_like("v", "r", "k", "a", "b")
chunk_rwkv7 = fla_dispatch(
    chunk_rwkv7_torch,
    FlaCall("ops.rwkv7", "chunk_rwkv7", (*ARGS, "cu_seqlens_cpu"), 6, kwargs=FLA_CHUNK_KWARGS, adapt=CAST, cp=True),
    note="Only fla's own tuning kwargs are forwarded (it takes no **kwargs); takes fla's cp_context.",
)
fused_recurrent_rwkv7 = fla_dispatch(
    fused_recurrent_rwkv7_torch,
    FlaCall("ops.rwkv7", "fused_recurrent_rwkv7", ARGS, 6, adapt=CAST),
    note="Extra kwargs are dropped (fla takes none).",
)
