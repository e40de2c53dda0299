"""Gated DeltaNet (arXiv:2412.06464): S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * q_t^T S_t, state `S [K, V]` per head, `g [B, T, H]` the per-token log decay (<= 0, not cumsum'd).

Signatures follow fla 0.6.0 (`fla.ops.gated_delta_rule`), including its in-kernel options:
`use_qk_l2norm_in_kernel` (l2-normalise q, k), `use_beta_sigmoid_in_kernel` (beta = sigmoid(beta), times 2 with
`allow_neg_eigval`), `use_gate_in_kernel` (g = -exp(A_log) * softplus(g + dt_bias)), `state_v_first` (state
stored `[V, K]`). `fused_recurrent_gated_delta_rule` also takes a per-key-channel decay `gk [B, T, H, K]`.
Grouped value heads (GVA): v, g, beta and the state may have HV = m * H heads; value head i uses q/k head i // m.
The PyTorch path does not implement the value-side decay `gv`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import _wy
from linear_moe.ops._dispatch import fla_op, like, use_fla
from linear_moe.ops.checks import check_layout, check_varlen
from linear_moe.ops.delta_rule import check_beta, delta_to_dplr

Tensor = torch.Tensor
CHUNK_SIZE = 64


def expand_gva(name: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat q, k `[B, T, H, K]` to v's HV heads (value head i reads q/k head i // (HV // H))."""
    h, hv = q.shape[2], v.shape[2]
    if q.dim() != 4 or v.dim() != 4 or hv == h:
        return q, k
    if hv % h:
        raise ValueError(f"{name}: v has {hv} heads, which must be a multiple of q/k's {h} heads (GVA)")
    return q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2)


def _check(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    initial_state: Tensor | None,
    state_v_first: bool,
    cu_seqlens: Tensor | None,
    gk: Tensor | None = None,
) -> None:
    n = cc.check_qkv(name, q, k, v, cu_seqlens, gk=gk)
    if g is not None:
        check_beta(name, q, g, "g")
    check_beta(name, q, beta)
    cc.check_state(name, initial_state, n, q.shape[2], q.shape[3], v.shape[3], state_v_first)


def _check_fla(name: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> None:
    """Layout checks before fla's kernel (which validates the rest; v may have more heads than q: GVA)."""
    check_layout(name, q=q, k=k)
    check_layout(name, v=v)
    check_varlen(name, q, cu_seqlens)


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _gates(g: Tensor | None, beta: Tensor, kwargs: dict, gk: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """Apply fla's in-kernel gate/beta activations; return (log decay `[B, T, H]` or `[B, T, H, K]`, beta)."""
    if kwargs.get("gv") is not None:
        raise ValueError("gated_delta_rule (torch path): a value-side decay `gv` is not supported; pass g or gk")
    if g is not None and kwargs.get("use_gate_in_kernel"):
        A_log, dt_bias = kwargs.get("A_log"), kwargs.get("dt_bias")
        if A_log is None:
            raise ValueError("gated_delta_rule: use_gate_in_kernel=True needs A_log [H]")
        g = _acc(g)
        g = -A_log.to(g.dtype).exp() * F.softplus(g if dt_bias is None else g + dt_bias.to(g.dtype))
    if kwargs.get("use_beta_sigmoid_in_kernel"):
        beta = _acc(beta).sigmoid() * (2.0 if kwargs.get("allow_neg_eigval") else 1.0)
    if gk is not None:
        g = gk if g is None else gk + g[..., None]
    return g, beta


def chunk_gated_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked WY form. q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g, beta `[B, T, HV]` (HV = H, or a
    multiple for GVA), initial_state `[N, HV, K, V]` (`[N, HV, V, K]` with state_v_first)
    -> o `[B, T, HV, V]` (v's dtype), final state like initial_state (float32) or None."""
    cc.reject_head_first("chunk_gated_delta_rule", kwargs)
    q, k = expand_gva("chunk_gated_delta_rule", q, k, v)
    _check("chunk_gated_delta_rule", q, k, v, g, beta, initial_state, state_v_first, cu_seqlens)
    g, beta = _gates(
        g, beta, dict(kwargs, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    )
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(
        _wy.chunk_dplr,
        q,
        kb,
        v,
        a,
        b,
        g,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


def fused_recurrent_gated_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path). g `[B, T, H]` and/or gk `[B, T, H, K]` (log decays, optional),
    beta `[B, T, H]` (default ones); shapes otherwise as `chunk_gated_delta_rule_torch`."""
    cc.reject_head_first("fused_recurrent_gated_delta_rule", kwargs)
    q, k = expand_gva("fused_recurrent_gated_delta_rule", q, k, v)
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    _check("fused_recurrent_gated_delta_rule", q, k, v, g, beta, initial_state, state_v_first, cu_seqlens, gk)
    opts = dict(
        gv=gv,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
    g, beta = _gates(g, beta, opts, gk)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(
        _wy.recurrent_dplr, q, kb, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first
    )


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `chunk_gated_delta_rule` on CUDA (bf16/fp16 inputs), else `chunk_gated_delta_rule_torch`."""
    cc.reject_head_first("chunk_gated_delta_rule", kwargs)
    if use_fla(q):
        _check_fla("chunk_gated_delta_rule", q, k, v, cu_seqlens)
        q, k, beta = like(v, q, k, beta)
        return fla_op("gated_delta_rule", "chunk_gated_delta_rule")(
            q,
            k,
            v,
            g,
            beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=cu_seqlens_cpu,
            **cc.fla_kwargs(kwargs),
        )
    return chunk_gated_delta_rule_torch(
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
        state_v_first,
        cu_seqlens,
        cu_seqlens_cpu,
        **kwargs,
    )


def fused_recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """fla's `fused_recurrent_gated_delta_rule` on CUDA, else `fused_recurrent_gated_delta_rule_torch`."""
    cc.reject_head_first("fused_recurrent_gated_delta_rule", kwargs)
    if use_fla(q):
        _check_fla("fused_recurrent_gated_delta_rule", q, k, v, cu_seqlens)
        q, k, beta = like(v, q, k, beta)
        return fla_op("gated_delta_rule", "fused_recurrent_gated_delta_rule")(
            q,
            k,
            v,
            g=g,
            gk=gk,
            gv=gv,
            beta=beta,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            use_gate_in_kernel=use_gate_in_kernel,
            A_log=A_log,
            dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval,
            state_v_first=state_v_first,
            cu_seqlens=cu_seqlens,
            **cc.fla_kwargs(kwargs),
        )
    return fused_recurrent_gated_delta_rule_torch(
        q,
        k,
        v,
        g,
        gk,
        gv,
        beta,
        scale,
        initial_state,
        output_final_state,
        use_qk_l2norm_in_kernel,
        use_gate_in_kernel,
        A_log,
        dt_bias,
        use_beta_sigmoid_in_kernel,
        allow_neg_eigval,
        state_v_first,
        cu_seqlens,
        **kwargs,
    )
