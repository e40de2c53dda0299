"""Gated Linear Attention (arXiv:2312.06635): a per-key-channel log decay `g [B, T, H, K]`,
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

fla names the decay `g` in `chunk_gla` but `gk` in `fused_recurrent_gla` (which also takes a value-side
decay `gv [B, T, H, V]`); both names are kept here. `g` is the raw per-token log decay (not cumsum'd).
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import checks
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch

Tensor = torch.Tensor
CHUNK_SIZE = 16  # the intra-chunk decay tensor is [C, C, K] per chunk: keep C small
COMMON = ("scale", "initial_state", "output_final_state")


def _check(name: str, a: Args) -> None:
    q, v = a["q"], a["v"]
    n = checks.check_qkv(name, q, a["k"], v, a["cu_seqlens"], g=a.get("g", a.get("gk")))
    checks.expect_shape(name, "gv", a.get("gv"), tuple(v.shape), "v.shape [B, T, H, V]")
    checks.check_state(name, a["initial_state"], n, q.shape[2], q.shape[3], v.shape[3], a["state_v_first"])


@checked(_check)
def chunk_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked form. q, k, g `[B, T, H, K]`, v `[B, T, H, V]`, initial_state `[N, H, K, V]`
    -> o `[B, T, H, V]`, final state `[N, H, K, V]` (float32) or None."""
    return cc.run_gated(
        cc.chunk_gated,
        q,
        k,
        v,
        g,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


@checked(_check)
def fused_recurrent_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path). gk `[B, T, H, K]`, gv `[B, T, H, V]` (optional)."""
    return cc.run_gated(
        cc.recurrent_gated,
        q,
        k,
        v,
        gk,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        gv=gv,
        reverse=reverse,
    )


def _float_state(a: Args) -> Args:
    return {**a, "initial_state": None if a["initial_state"] is None else a["initial_state"].float()}


chunk_gla = fla_dispatch(
    chunk_gla_torch,
    FlaCall(
        "ops.gla",
        "chunk_gla",
        ("q", "k", "v", "g", *COMMON, "state_v_first", "cu_seqlens", "cu_seqlens_cpu"),
        positional=4,
        adapt=_float_state,
    ),
    note="fla's chunk_gla takes no extra kwargs and asserts a float32 initial_state.",
)
fused_recurrent_gla = fla_dispatch(
    fused_recurrent_gla_torch,
    FlaCall(
        "ops.gla",
        "fused_recurrent_gla",
        ("q", "k", "v", "gk", "gv", *COMMON, "reverse", "state_v_first", "cu_seqlens"),
        positional=3,
        kwargs=True,
    ),
)
