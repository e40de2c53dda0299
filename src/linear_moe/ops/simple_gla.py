"""Simple GLA: linear attention with a scalar (per-head) log decay, the recurrence shared by RetNet
(arXiv:2307.08621), Lightning Attention (arXiv:2401.04658) and Mamba2's SSD (arXiv:2405.21060):
S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = scale * q_t^T S_t.

`g [B, T, H]` is a data-dependent log decay, `g_gamma [H]` a fixed one per head (both given: they add).
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import checks
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch

Tensor = torch.Tensor
CHUNK_SIZE = 64


def _check(name: str, a: Args) -> None:
    """Validate q/k/v, `g [B, T, H]`, `g_gamma [H]` and the state."""
    q, v = a["q"], a["v"]
    n = checks.check_qkv(name, q, a["k"], v, a["cu_seqlens"])
    checks.check_state(name, a["initial_state"], n, q.shape[2], q.shape[3], v.shape[3], a["state_v_first"])
    checks.expect_shape(name, "g", a["g"], tuple(q.shape[:3]), "[B, T, H]")
    checks.expect_shape(name, "g_gamma", a["g_gamma"], (q.shape[2],), "[H]")


def log_decay(q: Tensor, g: Tensor | None, g_gamma: Tensor | None) -> Tensor | None:
    """The per-token log decay `[B, T, H]` (or None) from `g [B, T, H]` and/or `g_gamma [H]`."""
    if g_gamma is None:
        return g
    gamma_BTH = g_gamma.to(cc.acc_dtype(q, g_gamma)).expand(q.shape[:3])
    return gamma_BTH if g is None else g + gamma_BTH


@checked(_check)
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
    return cc.run_gated(
        cc.chunk_gated,
        q,
        k,
        v,
        log_decay(q, g, g_gamma),
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


@checked(_check)
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
    return cc.run_gated(
        cc.recurrent_gated,
        q,
        k,
        v,
        log_decay(q, g, g_gamma),
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        reverse=reverse,
    )


ARGS = ("q", "k", "v", "g", "g_gamma", "scale", "initial_state", "output_final_state")
chunk_simple_gla = fla_dispatch(
    chunk_simple_gla_torch,
    FlaCall("ops.simple_gla", "chunk_simple_gla", (*ARGS, "state_v_first", "cu_seqlens", "cu_seqlens_cpu"), 3, True),
)
fused_recurrent_simple_gla = fla_dispatch(
    fused_recurrent_simple_gla_torch,
    FlaCall("ops.simple_gla", "fused_recurrent_simple_gla", (*ARGS, "reverse", "state_v_first", "cu_seqlens"), 3, True),
)
