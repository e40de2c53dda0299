"""One long sequence through P pieces run as a batch (issue 15): the chunked ops of the diagonal-decay families
(gla, simple_gla) with the sequence cut into pieces of `piece_len` tokens that run side by side as batch rows.

Why: fla's chunk kernels pass the state through a sequence chunk by chunk, one program per (row, head, block).
At batch 1 and 8 heads that is a few dozen programs on an H200's 132 SMs, so one 65,536-token row costs 3x the
same tokens as 32 rows of 2,048 (docs/benchmarks.md). Pieces as rows give the state pass P times the programs.

The recurrence S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T is affine in its initial state: a piece p that starts
from S0_p ends at  exp(G_p) * S0_p + S_p, where G_p = sum of the log decays w over the piece (per key channel for
gla, per head for simple_gla) and S_p the piece's final state from zeros. So (the single-device form of the
LASP-2-style combine in `parallel/cp.py`, without collectives and without probe runs):

 1. local states: S_p of every piece, all pieces at once (`local="op"`: the chunk op on the pieces from zero
    states, its outputs unused; `local="sum"`: the closed form S_p = sum_t (k_t * exp(G_p - W_t))^T v_t with
    W_t the inclusive sum of w within the piece, one batched matmul in the accumulation dtype);
 2. a scan over the pieces: S0_0 = initial_state (or zeros), S0_{p+1} = exp(G_p) * S0_p + S_p
    (log2(P) elementwise steps, no matmul, so autocast cannot round it);
 3. the chunk op on the pieces from S0_p gives every output exactly, and the last piece's final state is the
    sequence's.

Autograd runs through all three (fla's chunk ops take gradients of initial_state and of the final state), so the
gradients are the unsplit op's. T not a multiple of `piece_len`: the end is padded with zero q, k, v and zero log
decay, which leaves the state unchanged, and the padded outputs are dropped. Cost on the GPU: the chunk op twice
over short rows (`local="op"`) or once plus a matmul (`local="sum"`, which keeps [B, T, H, K] and [B, T, H, V]
float32 copies for its backward); the speed against the unsplit op has not been measured yet (docs/ops.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linear_moe.ops import gla, simple_gla
from linear_moe.ops._chunk_common import acc_dtype
from linear_moe.ops._dispatch import bind

Tensor = torch.Tensor
LOCAL = ("op", "sum")  # how step 1 gets the pieces' final states from zeros


def _pieces(t: Tensor | None, P: int, L: int) -> Tensor | None:
    """`[B, T, ...]` -> `[B*P, L, ...]`, zero-padded at the end to P*L tokens (a view when nothing is padded)."""
    if t is None:
        return None
    pad = P * L - t.shape[1]
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0] * P, L, *t.shape[2:])


def scan_states(decay_BPX: Tensor | None, local_BPHKV: Tensor, s0_BHKV: Tensor | None) -> Tensor:
    """The state each piece starts from, `[B, P, H, K, V]`: S0_0 = s0 (zeros when None) and
    S0_{p+1} = exp(decay_p) * S0_p + local_p, with `decay_BPX` the pieces' summed log decays broadcastable to
    `[B, P, H, K, 1]` (None: no decay). A Hillis-Steele inclusive scan of the affine maps (a, b): S -> e^a S + b
    over the elements (0, s0), (decay_0, local_0), ..., (decay_{P-2}, local_{P-2}); every exponent is a sum of
    log decays, so it is <= 0 and the factors stay in [0, 1]."""
    s0 = local_BPHKV.new_zeros(local_BPHKV[:, :1].shape) if s0_BHKV is None else s0_BHKV[:, None]
    dt = torch.promote_types(s0.dtype, local_BPHKV.dtype)
    b = torch.cat([s0.to(dt), local_BPHKV[:, :-1].to(dt)], 1)
    if decay_BPX is None:
        return b.cumsum(1)
    a = torch.cat([torch.zeros_like(decay_BPX[:, :1]), decay_BPX[:, :-1]], 1)
    d = 1
    while d < b.shape[1]:  # after this step, element p holds the composition of elements p-2d+1 .. p
        b = torch.cat([b[:, :d], b[:, d:] + a[:, d:].exp() * b[:, :-d]], 1)
        a = torch.cat([a[:, :d], a[:, d:] + a[:, :-d]], 1)
        d *= 2
    return b


def local_states_sum(k_BTHK: Tensor, v_BTHV: Tensor, w_BTHX: Tensor | None) -> Tensor:
    """Final states from zero `[B, H, K, V]` of rows k, v with per-token log decays `w_BTHX` (`[B, T, H, K]` per
    key channel, `[B, T, H, 1]` per head, None: no decay): sum_t (k_t * exp(sum_{s>t} w_s))^T v_t, in the
    accumulation dtype with autocast off (a bf16 matmul would round the state)."""
    dt = acc_dtype(k_BTHK, v_BTHV, w_BTHX)
    with torch.autocast(k_BTHK.device.type, enabled=False):
        k = k_BTHK.to(dt)
        if w_BTHX is not None:
            w = w_BTHX.to(dt)
            after_BTHX = torch.cat([w[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(w[:, :1])], 1)
            k = k * after_BTHX.exp()  # exponents <= 0
        return torch.einsum("bthk,bthv->bhkv", k, v_BTHV.to(dt))


def _split(
    op: Any,
    time_args: dict[str, Tensor | None],
    other: dict[str, Any],
    w_BTHX: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    piece_len: int,
    local: str,
) -> tuple[Tensor, Tensor | None]:
    """Run `op(**time_args, **other, initial_state, output_final_state)` over pieces of `piece_len` tokens (module
    docstring). `w_BTHX`: the per-token log decay broadcastable per key channel (`[B, T, H, K|1]`) or None."""
    q = time_args["q"]
    B, T = q.shape[:2]
    P = -(-T // piece_len)
    if P <= 1:
        return op(**time_args, **other, initial_state=initial_state, output_final_state=output_final_state)
    L = piece_len
    pieces = {n: _pieces(t, P, L) for n, t in time_args.items()}
    w = _pieces(w_BTHX, P, L)
    if local == "op":  # the pieces' outputs are unused: q takes no gradient from this run
        _, s = op(**{**pieces, "q": pieces["q"].detach()}, **other, output_final_state=True)
    else:
        s = local_states_sum(pieces["k"], pieces["v"], w)
    s_BPHKV = s.unflatten(0, (B, P))
    decay_BPX = None
    if w is not None:
        decay_BPX = w.to(acc_dtype(w, s)).sum(1).unflatten(0, (B, P))[..., None]  # [B, P, H, K|1, 1]
    s0_BPHKV = scan_states(decay_BPX, s_BPHKV, initial_state)
    o, s_final = op(
        **pieces, **other, initial_state=s0_BPHKV.flatten(0, 1).contiguous(), output_final_state=output_final_state
    )
    o_BTHV = o.unflatten(0, (B, P)).flatten(1, 2)[:, :T]
    return o_BTHV, (s_final.unflatten(0, (B, P))[:, -1] if output_final_state else None)


def _check(name: str, op: Any, piece_len: int, local: str, cu_seqlens: Tensor | None, *args: Any, **kw: Any) -> None:
    """The op's own input checks, then the split's: a positive `piece_len`, a known `local`, no packing."""
    op.check(name, bind(op.__signature__, args, kw))
    if not isinstance(piece_len, int) or piece_len < 1:
        raise ValueError(f"{name}: piece_len must be a positive number of tokens, got {piece_len!r}")
    if local not in LOCAL:
        raise ValueError(f"{name}: local must be one of {', '.join(LOCAL)}, got {local!r}")
    if cu_seqlens is not None:
        raise ValueError(f"{name}: packed input (cu_seqlens) is not split; call the op itself for packed documents")


def chunk_gla_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: None = None,
    *,
    piece_len: int,
    local: str = "op",
) -> tuple[Tensor, Tensor | None]:
    """`gla.chunk_gla` (fla's kernel on CUDA, our PyTorch form elsewhere) of rows `[B, T, H, *]` computed through
    pieces of `piece_len` tokens run as a batch: the same output `[B, T, H, V]`, final state `[B, H, K, V]` and
    gradients (module docstring). `local`: "op" or "sum", how the pieces' own final states are found."""
    _check("chunk_gla_split", gla.chunk_gla, piece_len, local, cu_seqlens, q, k, v, g, scale, initial_state)
    return _split(
        gla.chunk_gla,
        {"q": q, "k": k, "v": v, "g": g},
        {"scale": scale},
        g,
        initial_state,
        output_final_state,
        piece_len,
        local,
    )


def chunk_simple_gla_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    g_gamma: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: None = None,
    *,
    piece_len: int,
    local: str = "op",
) -> tuple[Tensor, Tensor | None]:
    """`simple_gla.chunk_simple_gla` (per-head decay `g [B, T, H]` and/or `g_gamma [H]`: RetNet, Lightning,
    Mamba2's SSD) computed through pieces of `piece_len` tokens, as `chunk_gla_split`. The pieces run with
    g = g + g_gamma (fla's data-dependent decay path) and g_gamma unset."""
    args = (q, k, v, g, g_gamma, scale, initial_state)
    _check("chunk_simple_gla_split", simple_gla.chunk_simple_gla, piece_len, local, cu_seqlens, *args)
    # g_gamma folded into g: padding the end then adds no decay, and g_gamma gets its whole gradient on every
    # device (fla's kernels give g_gamma none, so a split run would otherwise give it only the scan's part)
    w_BTH = simple_gla.log_decay(q, g, g_gamma)
    w_BTH = None if w_BTH is None else w_BTH.contiguous()
    return _split(
        simple_gla.chunk_simple_gla,
        {"q": q, "k": k, "v": v, "g": w_BTH},
        {"scale": scale},
        None if w_BTH is None else w_BTH[..., None],
        initial_state,
        output_final_state,
        piece_len,
        local,
    )
