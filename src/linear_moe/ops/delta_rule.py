"""DeltaNet's delta rule (arXiv:2406.06484): S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * q_t^T S_t, with state `S [K, V]` per head and `beta [B, T, H]` (usually in (0, 1)).

Signatures follow fla 0.6.0 (`fla.ops.delta_rule`). `fused_recurrent_delta_rule` defaults `beta` to ones.
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _wy, checks
from linear_moe.ops._dispatch import Args, FlaCall, cast_like, checked, fla_dispatch

Tensor = torch.Tensor
CHUNK_SIZE = 64


def _check(name: str, a: Args) -> None:
    q, v = a["q"], a["v"]
    n = checks.check_qkv(name, q, a["k"], v, a["cu_seqlens"])
    checks.check_per_head(name, q, a["beta"], "beta")
    checks.check_state(name, a["initial_state"], n, q.shape[2], q.shape[3], v.shape[3])


def delta_to_dplr(
    q: Tensor, k: Tensor, beta: Tensor, use_qk_l2norm_in_kernel: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, a, b) of the DPLR engine for a delta rule: a = k, b = -beta k, key = beta k."""
    if use_qk_l2norm_in_kernel:
        q, k = _wy.l2norm(q), _wy.l2norm(k)
    kb = k * beta[..., None].to(k.dtype)
    return q, kb, k, -kb


@checked(_check)
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


@checked(_check)
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
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(_wy.recurrent_dplr, q, kb, v, a, b, None, scale, initial_state, output_final_state, cu_seqlens)


ARGS = ("q", "k", "v", "beta", "scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel", "cu_seqlens")
chunk_delta_rule = fla_dispatch(
    chunk_delta_rule_torch,
    FlaCall(
        "ops.delta_rule",
        "chunk_delta_rule",
        (*ARGS, "cu_seqlens_cpu"),
        positional=4,
        kwargs=True,
        when=lambda a: a["v"].dtype != torch.float32,
        adapt=cast_like("v", "q", "k", "beta"),
    ),
    note="fla's kernel takes bf16/fp16 only: float32 CUDA inputs run the PyTorch path.",
)
fused_recurrent_delta_rule = fla_dispatch(
    fused_recurrent_delta_rule_torch,
    FlaCall("ops.delta_rule", "fused_recurrent_delta_rule", ARGS, positional=4, adapt=cast_like("v", "q", "k", "beta")),
    note="Extra kwargs are dropped (fla takes none).",
)
