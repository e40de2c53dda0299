"""Gated Linear Attention (arXiv:2312.06635): a per-key-channel log decay `g [B, T, H, K]`,
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

fla names the decay `g` in `chunk_gla` but `gk` in `fused_recurrent_gla` (which also takes a value-side
decay `gv [B, T, H, V]`); both names are kept here. `g` is the raw per-token log decay (not cumsum'd).
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops._dispatch import fla_op, use_fla

Tensor = torch.Tensor
CHUNK_SIZE = 16  # the intra-chunk decay tensor is [C, C, K] per chunk: keep C small


def _check(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor | None,
    gv: Tensor | None,
    initial_state: Tensor | None,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
) -> None:
    n = cc.check_qkv(name, q, k, v, cu_seqlens, g=gk)
    cc.expect_shape(name, "gv", gv, tuple(v.shape), "v.shape [B, T, H, V]")
    cc.check_state(name, initial_state, n, q.shape[2], q.shape[3], v.shape[3], state_v_first)


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
    cc.reject_head_first("chunk_gla", kwargs)
    _check("chunk_gla", q, k, v, g, None, initial_state, state_v_first, cu_seqlens)
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
    cc.reject_head_first("fused_recurrent_gla", kwargs)
    _check("fused_recurrent_gla", q, k, v, gk, gv, initial_state, state_v_first, cu_seqlens)
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


def chunk_gla(
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
    """fla's `chunk_gla` on CUDA (extra kwargs dropped: fla takes none; initial_state cast to float32,
    which fla asserts), else `chunk_gla_torch`."""
    cc.reject_head_first("chunk_gla", kwargs)
    if use_fla(q):
        _check("chunk_gla", q, k, v, g, None, initial_state, state_v_first, cu_seqlens)
        return fla_op("gla", "chunk_gla")(
            q,
            k,
            v,
            g,
            scale=scale,
            initial_state=None if initial_state is None else initial_state.float(),
            output_final_state=output_final_state,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
        )
    return chunk_gla_torch(
        q, k, v, g, scale, initial_state, output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu, **kwargs
    )


def fused_recurrent_gla(
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
    """fla's `fused_recurrent_gla` on CUDA, else `fused_recurrent_gla_torch`."""
    cc.reject_head_first("fused_recurrent_gla", kwargs)
    if use_fla(q):
        _check("fused_recurrent_gla", q, k, v, gk, gv, initial_state, state_v_first, cu_seqlens)
        return fla_op("gla", "fused_recurrent_gla")(
            q,
            k,
            v,
            gk=gk,
            gv=gv,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            reverse=reverse,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            **cc.fla_kwargs(kwargs),
        )
    return fused_recurrent_gla_torch(
        q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens, **kwargs
    )
