"""DeltaNet's delta rule (arXiv:2406.06484): S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * q_t^T S_t, with state `S [K, V]` per head and `beta [B, T, H]` (usually in (0, 1)).

Signatures follow fla 0.6.0 (`fla.ops.delta_rule`). `fused_recurrent_delta_rule` defaults `beta` to ones.
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import _wy
from linear_moe.ops._dispatch import fla_op, like, use_fla

Tensor = torch.Tensor
CHUNK_SIZE = 64


def check_beta(name: str, q: Tensor, beta: Tensor, arg: str = "beta") -> None:
    cc.expect_shape(name, arg, beta, tuple(q.shape[:3]), "q.shape[:3] [B, T, H]")


def _check(
    name: str, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | None
) -> None:
    n = cc.check_qkv(name, q, k, v, cu_seqlens)
    check_beta(name, q, beta)
    cc.check_state(name, initial_state, n, q.shape[2], q.shape[3], v.shape[3])


def delta_to_dplr(
    q: Tensor, k: Tensor, beta: Tensor, use_qk_l2norm_in_kernel: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, a, b) of the DPLR engine for a delta rule: a = k, b = -beta k, key = beta k."""
    if use_qk_l2norm_in_kernel:
        q, k = _wy.l2norm(q), _wy.l2norm(k)
    kb = k * beta[..., None].to(k.dtype)
    return q, kb, k, -kb


def chunk_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked WY form. q, k `[B, T, H, K]`, v `[B, T, H, V]`, beta `[B, T, H]`,
    initial_state `[N, H, K, V]` -> o `[B, T, H, V]` (v's dtype), final state `[N, H, K, V]` (float32) or None."""
    cc.reject_head_first("chunk_delta_rule", kwargs)
    _check("chunk_delta_rule", q, k, v, beta, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(
        _wy.chunk_dplr,
        q,
        kb,
        v,
        a,
        b,
        None,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


def fused_recurrent_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path); same shapes as `chunk_delta_rule_torch`, beta defaults to ones."""
    cc.reject_head_first("fused_recurrent_delta_rule", kwargs)
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    _check("fused_recurrent_delta_rule", q, k, v, beta, initial_state, cu_seqlens)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(_wy.recurrent_dplr, q, kb, v, a, b, None, scale, initial_state, output_final_state, cu_seqlens)


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `chunk_delta_rule` on CUDA for bf16/fp16 inputs, else `chunk_delta_rule_torch` (fla's kernel
    rejects float32, so float32 CUDA inputs take the PyTorch path)."""
    cc.reject_head_first("chunk_delta_rule", kwargs)
    if use_fla(q) and v.dtype != torch.float32:
        q, k, beta = like(v, q, k, beta)
        _check("chunk_delta_rule", q, k, v, beta, initial_state, cu_seqlens)
        return fla_op("delta_rule", "chunk_delta_rule")(
            q,
            k,
            v,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            **cc.fla_kwargs(kwargs),
        )
    return chunk_delta_rule_torch(
        q,
        k,
        v,
        beta,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        cu_seqlens,
        cu_seqlens_cpu,
        **kwargs,
    )


def fused_recurrent_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `fused_recurrent_delta_rule` on CUDA (extra kwargs dropped: it takes none), else the torch loop."""
    cc.reject_head_first("fused_recurrent_delta_rule", kwargs)
    if use_fla(q):
        q, k, beta = like(v, q, k, beta)
        _check(
            "fused_recurrent_delta_rule",
            q,
            k,
            v,
            torch.ones_like(q[..., 0]) if beta is None else beta,
            initial_state,
            cu_seqlens,
        )
        return fla_op("delta_rule", "fused_recurrent_delta_rule")(
            q,
            k,
            v,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            cu_seqlens=cu_seqlens,
        )
    return fused_recurrent_delta_rule_torch(
        q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens, **kwargs
    )
