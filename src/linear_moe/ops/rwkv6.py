"""RWKV-6 "Finch" time mixing (arXiv:2404.05892) with per-key-channel log decay `w [B, T, H, K]` and
bonus `u [H, K]`:  o_t = scale * r_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T.

`w` is the log decay itself (RWKV's `-exp(w_raw)`), as in fla; the default scale is K^-0.5 (RWKV uses 1.0,
so its mixers pass `scale=1.0`).
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import checks
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch, needs_grad

Tensor = torch.Tensor
CHUNK_SIZE = 16  # the intra-chunk decay tensor is [C, C, K] per chunk: keep C small


def _check(name: str, a: Args) -> None:
    r, v = a["r"], a["v"]
    n = checks.check_qkv(name, r, a["k"], v, a["cu_seqlens"], w=a["w"])
    checks.expect_shape(name, "u", a["u"], tuple(r.shape[2:]), "[H, K]")
    checks.check_state(name, a["initial_state"], n, r.shape[2], r.shape[3], v.shape[3])


@checked(_check)
def chunk_rwkv6_torch(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked form. r, k, w `[B, T, H, K]`, v `[B, T, H, V]`, u `[H, K]`, initial_state `[N, H, K, V]`
    -> o `[B, T, H, V]`, final state `[N, H, K, V]` (float32) or None."""
    return cc.run_gated(
        cc.chunk_gated,
        r,
        k,
        v,
        w,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        bonus_HK=u,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
        rwkv=True,
    )


@checked(_check)
def fused_recurrent_rwkv6_torch(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path); same shapes as `chunk_rwkv6_torch`."""
    return cc.run_gated(
        cc.recurrent_gated,
        r,
        k,
        v,
        w,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        bonus_HK=u,
        reverse=reverse,
    )


COMMON = ("scale", "initial_state", "output_final_state")
chunk_rwkv6 = fla_dispatch(
    chunk_rwkv6_torch,
    FlaCall(
        "ops.rwkv6",
        "chunk_rwkv6",
        ("r", "k", "v", "w", "u", *COMMON, "cu_seqlens", "cu_seqlens_cpu"),
        positional=5,
        kwargs=True,
    ),
)
fused_recurrent_rwkv6 = fla_dispatch(
    fused_recurrent_rwkv6_torch,
    FlaCall(
        "ops.rwkv6",
        "chunk_rwkv6",
        ("r", "k", "v", "w", "u", *COMMON, "cu_seqlens"),
        positional=5,
        drops=("reverse",),
        when=lambda a: needs_grad(a, "r", "k", "v", "w", "u", "initial_state") and not a["reverse"],
    ),
    FlaCall("ops.rwkv6", "fused_recurrent_rwkv6", ("r", "k", "v", "w", "u", *COMMON, "reverse", "cu_seqlens"), 5),
    note="Extra kwargs are dropped (fla's fused_recurrent_rwkv6 takes none). On the H200 (fla 0.6.0, Triton 3.7.1) "
    "the backward of fla's fused recurrent kernel disagrees with the recurrence by ~5% in dk/dv/dw (its forward and "
    "fla's chunk kernel agree to bf16 precision), so a call that needs gradients runs fla's `chunk_rwkv6`, which "
    "computes the same function.",
)
