"""Simple GLA: linear attention with a scalar (per-head) log decay, the recurrence shared by RetNet
(arXiv:2307.08621), Lightning Attention (arXiv:2401.04658) and Mamba2's SSD (arXiv:2405.21060):
S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

`g [B, T, H]` is a data-dependent log decay, `g_gamma [H]` a fixed one per head (both given: they add).
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops._dispatch import fla_op, use_fla

Tensor = torch.Tensor
CHUNK_SIZE = 64


def _log_decay(name: str, q: Tensor, g: Tensor | None, g_gamma: Tensor | None) -> Tensor | None:
    """Validate `g [B, T, H]` / `g_gamma [H]` and return the per-token log decay `[B, T, H]` (or None)."""
    cc.expect_shape(name, "g", g, tuple(q.shape[:3]), "[B, T, H]")
    cc.expect_shape(name, "g_gamma", g_gamma, (q.shape[2],), "[H]")
    if g_gamma is None:
        return g
    gamma_BTH = g_gamma.to(cc.acc_dtype(q, g_gamma)).expand(q.shape[:3])
    return gamma_BTH if g is None else g + gamma_BTH


def _check(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    g_gamma: Tensor | None,
    initial_state: Tensor | None,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
) -> Tensor | None:
    n = cc.check_qkv(name, q, k, v, cu_seqlens)
    cc.check_state(name, initial_state, n, q.shape[2], q.shape[3], v.shape[3], state_v_first)
    return _log_decay(name, q, g, g_gamma)


def chunk_simple_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked form. q, k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]`, g_gamma `[H]`,
    initial_state `[N, H, K, V]` -> o `[B, T, H, V]`, final state `[N, H, K, V]` (float32) or None."""
    cc.reject_head_first("chunk_simple_gla", kwargs)
    g = _check("chunk_simple_gla", q, k, v, g, g_gamma, initial_state, state_v_first, cu_seqlens)
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


def fused_recurrent_simple_gla_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path); same shapes as `chunk_simple_gla_torch`."""
    cc.reject_head_first("fused_recurrent_simple_gla", kwargs)
    g = _check("fused_recurrent_simple_gla", q, k, v, g, g_gamma, initial_state, state_v_first, cu_seqlens)
    return cc.run_gated(
        cc.recurrent_gated,
        q,
        k,
        v,
        g,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        reverse=reverse,
    )


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `chunk_simple_gla` on CUDA, else `chunk_simple_gla_torch` (same arguments)."""
    cc.reject_head_first("chunk_simple_gla", kwargs)
    if use_fla(q):
        _check("chunk_simple_gla", q, k, v, g, g_gamma, initial_state, state_v_first, cu_seqlens)
        return fla_op("simple_gla", "chunk_simple_gla")(
            q,
            k,
            v,
            g=g,
            g_gamma=g_gamma,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            **cc.fla_kwargs(kwargs),
        )
    return chunk_simple_gla_torch(
        q,
        k,
        v,
        g,
        g_gamma,
        scale,
        initial_state,
        output_final_state,
        state_v_first,
        cu_seqlens,
        cu_seqlens_cpu,
        **kwargs,
    )


def fused_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `fused_recurrent_simple_gla` on CUDA, else `fused_recurrent_simple_gla_torch`."""
    cc.reject_head_first("fused_recurrent_simple_gla", kwargs)
    if use_fla(q):
        _check("fused_recurrent_simple_gla", q, k, v, g, g_gamma, initial_state, state_v_first, cu_seqlens)
        return fla_op("simple_gla", "fused_recurrent_simple_gla")(
            q,
            k,
            v,
            g=g,
            g_gamma=g_gamma,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            reverse=reverse,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            **cc.fla_kwargs(kwargs),
        )
    return fused_recurrent_simple_gla_torch(
        q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse, state_v_first, cu_seqlens, **kwargs
    )
