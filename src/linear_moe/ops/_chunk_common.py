"""PyTorch engines shared by the gated-linear-attention ops (simple_gla, linear_attn, gla, hgrn, rwkv6).

All of them are one recurrence over a state `S [K, V]` per head with a log-space decay `g` (scalar per head
or per key channel):

    GLA form  (arXiv:2312.06635):  S_t = exp(g_t) * S_{t-1} + k_t v_t^T,   o_t = scale * q_t^T S_t
    RWKV form (arXiv:2404.05892):  o_t = scale * q_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t = exp(g_t) * S_{t-1} + k_t v_t^T

`chunk_gated` computes it in chunks (intra-chunk attention-like product with a causal mask, inter-chunk
state passing); `recurrent_gated` is the token loop. Both accumulate in float32 (float64 if any input is
float64). Every exponent formed is a *relative* decay `G_i - G_j <= 0` with `G` the within-chunk cumulative
sum, so strong decays underflow to exact zeros instead of overflowing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from linear_moe.ops import varlen

Tensor = torch.Tensor


def acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the accumulation dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def packed(
    fn: Callable[..., tuple[Tensor, Tensor]], cu_seqlens: Tensor | None, *time_tensors: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Run `fn(*time_tensors) -> (o [B, T, ...], S)`; with `cu_seqlens` pad documents into a batch first.

    Zero padding at the end of each document is neutral (zero key/value, zero log decay), so the batched
    final state row n is document n's final state."""
    if cu_seqlens is None:
        return fn(*time_tensors)
    padded = [None if t is None else varlen.pad(t, cu_seqlens) for t in time_tensors]
    o, s = fn(*padded)
    return varlen.unpad(o, cu_seqlens), s


def run_gated(
    engine: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    state_v_first: bool = False,
    gv: Tensor | None = None,
    **opts: Any,
) -> tuple[Tensor, Tensor | None]:
    """Call `engine` (`chunk_gated` or `recurrent_gated`) the way the public ops do: default scale K^-0.5,
    packed documents, optional `[V, K]` state layout; o in q's dtype, the state only when asked for."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    h0 = initial_state.transpose(-1, -2) if (state_v_first and initial_state is not None) else initial_state

    def fn(q_: Tensor, k_: Tensor, v_: Tensor, g_: Tensor | None, gv_: Tensor | None) -> tuple[Tensor, Tensor]:
        return engine(q_, k_, v_, g_, scale, h0, **({} if gv_ is None else {"gv": gv_}), **opts)

    o, s = packed(fn, cu_seqlens, q, k, v, g, gv)
    if not output_final_state:
        return o.to(q.dtype), None
    return o.to(q.dtype), (s.transpose(-1, -2) if state_v_first else s)


def _to_chunks(x: Tensor, n: int, c: int) -> Tensor:
    """`[B, N*C, H, *D]` -> `[B, H, N, C, *D]`."""
    b, _, h = x.shape[:3]
    return x.reshape(b, n, c, h, *x.shape[3:]).movedim(3, 1)


def chunker(T: int, C: int, dt: torch.dtype) -> tuple[int, Callable[[Tensor], Tensor]]:
    """Number of chunks N for T tokens and a function `[B, T, H, *D]` -> `[B, H, N, C, *D]` that casts to `dt`
    and zero-pads the end of the sequence (neutral: gates are log-space)."""
    N = max(1, -(-T // C))
    pad = N * C - T

    def prep(x: Tensor) -> Tensor:
        x = x.to(dt)
        return _to_chunks(torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x, N, C)

    return N, prep


def chunk_gated(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int,
    bonus_HK: Tensor | None = None,
    rwkv: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked form of the gated recurrence (module docstring). No loop over tokens; one over chunks.

    g: log decay, `[B, T, H]` (per head) or `[B, T, H, K]` (per key channel), or None (no decay).
    rwkv: RWKV form (read the state before this token's update, diagonal weighted by `bonus_HK [H, K]`).
    Returns o `[B, T, H, V]` and the final state `[B, H, K, V]`, both in the accumulation dtype.
    """
    dt = acc_dtype(q_BTHK, k_BTHK, v_BTHV, g, initial_state)
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    C = chunk_size
    N, prep = chunker(T, C, dt)
    if g is None:
        g = q_BTHK.new_zeros(B, T, H, dtype=dt)
    scalar = g.dim() == 3

    q, k, v = prep(q_BTHK) * scale, prep(k_BTHK), prep(v_BTHV)  # [B, H, N, C, K|V]
    g = prep(g if not scalar else g[..., None])  # [B, H, N, C, K] or [B, H, N, C, 1]
    G = g.cumsum(3)  # inclusive within-chunk log decay
    Gq = G - g if rwkv else G  # the query reads the state after (GLA) or before (RWKV) its own decay

    i = torch.arange(C, device=q.device)
    blocked = (i[:, None] < i[None, :]) if not rwkv else (i[:, None] <= i[None, :])  # [C, C] not allowed
    if scalar:
        rel = (Gq[..., :, None, 0] - G[..., None, :, 0]).masked_fill(blocked, float("-inf"))  # [B, H, N, C, C]
        A = (q @ k.transpose(-1, -2)) * rel.exp()
    else:
        rel = (Gq[..., :, None, :] - G[..., None, :, :]).masked_fill(blocked[..., None], float("-inf"))
        A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, rel.exp())  # [B, H, N, C, C]
    o = A @ v
    if bonus_HK is not None:
        u = bonus_HK.to(dt)[None, :, None, None, :]
        o = o + (q * u * k).sum(-1, keepdim=True) * v

    # inter-chunk: per-chunk state contributions, then a short loop over chunks to accumulate them
    G_last = G[..., -1:, :]  # [B, H, N, 1, K|1]
    U_BHNKV = (k * (G_last - G).exp()).transpose(-1, -2) @ v
    decay_BHNK = G_last[..., 0, :].exp()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    starts = []
    for n in range(N):
        starts.append(S)
        S = decay_BHNK[:, :, n, :, None] * S + U_BHNKV[:, :, n]
    o = o + (q * Gq.exp()) @ torch.stack(starts, dim=2)
    o_BTHV = o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o_BTHV, S


def recurrent_gated(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    gk: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    gv: Tensor | None = None,
    bonus_HK: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Token loop of the gated recurrence (GLA form, or RWKV form when `bonus_HK` is given).

    gk: key-side log decay `[B, T, H]` or `[B, T, H, K]` (or None); gv: value-side log decay `[B, T, H, V]`.
    reverse: scan from the last token to the first. Returns o `[B, T, H, V]` and S `[B, H, K, V]`.
    """
    dt = acc_dtype(q_BTHK, k_BTHK, v_BTHV, gk, gv, initial_state)
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    q, k, v = q_BTHK.to(dt) * scale, k_BTHK.to(dt), v_BTHV.to(dt)
    if gk is not None and gk.dim() == 3:
        gk = gk[..., None]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    u = None if bonus_HK is None else bonus_HK.to(dt)[None, :, :, None]
    outs = [None] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        if u is not None:
            outs[t] = (q[:, t, :, :, None] * (S + u * kv)).sum(-2)
        if gk is not None:
            S = S * gk[:, t].to(dt).exp()[..., None]
        if gv is not None:
            S = S * gv[:, t].to(dt).exp()[..., None, :]
        S = S + kv
        if u is None:
            outs[t] = (q[:, t, :, :, None] * S).sum(-2)
    o = torch.stack(outs, dim=1) if T else v.new_zeros(B, 0, H, V)
    return o, S
