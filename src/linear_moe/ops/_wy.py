"""PyTorch engines shared by the delta-rule family (delta_rule, gated_delta_rule, rwkv7).

All three are one diagonal-plus-low-rank (DPLR) recurrence over a state `S [K, V]` per head, with a log decay
`g` (scalar per head or per key channel), `D_t = diag(exp(g_t))`:

    S_t = D_t S_{t-1} + b_t (a_t^T X_t) + k_t v_t^T,      o_t = scale * q_t^T S_t
    X_t = S_{t-1} (a_pre_decay, RWKV-7 / fla's generalized_delta_rule)   or   D_t S_{t-1} (otherwise)

DeltaNet (arXiv:2406.06484) is a = k, b = -beta k, k <- beta k, no decay; Gated DeltaNet (arXiv:2412.06464)
adds the scalar decay g; RWKV-7 (arXiv:2503.14456) uses a per-channel decay and free a, b.

`chunk_dplr` is the chunked WY/UT form: within a chunk, the rows u_j = a_j^T X_j solve the unit lower-triangular
system (I - A_ab) U = A_ak V + (a * decay) S_0 (solved with `solve_triangular`), then the chunk's outputs and
final state are matmuls; a loop over chunks passes the state. With G the within-chunk cumulative log decay, a
scalar decay enters the intra-chunk products as the exact relative decay `exp(G_i - G_j)`, `G_i - G_j <= 0` (so
strong decays underflow to zero instead of overflowing); a per-channel decay is factorised relative to the chunk
start, `exp(G_i) * exp(-G_j)`, as fla does, so every product is a `[C, K] @ [K, C]` matmul (no `[C, C, K]` decay
tensor), with the chunk shortened until it spans at most e^40 of decay (`factorised_chunk_size`). Decays from a
token to the chunk's end and from the chunk's start are `<= 1`.
`recurrent_dplr` is the token loop (decoding path and reference). Both accumulate in float32 (float64 if any
input is float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from linear_moe.ops import _chunk_common as cc

Tensor = torch.Tensor


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32 or float64 (fla's `use_qk_l2norm_in_kernel`)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


FACTOR_RANGE = 40.0  # total |log decay| a chunk may span when per-channel decays are factorised (e^40 ~ 2e17)


def factorised_chunk_size(g_BTHK: Tensor, chunk_size: int) -> int:
    """The chunk size (`chunk_size` halved until it fits) whose tokens span at most FACTOR_RANGE of log decay.

    Per-channel decays are factorised relative to the chunk start, exp(G_i - G_j) = exp(G_i) * exp(-G_j), which
    turns each intra-chunk product into one `[C, K] @ [K, C]` matmul instead of a `[C, C, K]` decay tensor.
    exp(-G_j) grows with the decay the chunk spans; bounding that by e^40 keeps every factor and every kept
    product far inside float32's range (1e-38 .. 3e38), so the result stays exact to rounding."""
    worst = float(g_BTHK.detach().abs().amax()) if g_BTHK.numel() else 0.0
    C = chunk_size
    while C > 1 and C * worst > FACTOR_RANGE:
        C //= 2
    return C


def chunk_dplr(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    a_BTHK: Tensor,
    b_BTHK: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    chunk_size: int,
    a_pre_decay: bool = False,
) -> tuple[Tensor, Tensor]:
    """Chunked WY form of the DPLR recurrence (module docstring). No loop over tokens; one over chunks.

    g: log decay `[B, T, H]` (per head) or `[B, T, H, K]` (per key channel), or None (no decay).
    Returns o `[B, T, H, V]` and the final state `[B, H, K, V]`, both in the accumulation dtype.
    """
    dt = cc.acc_dtype(q_BTHK, k_BTHK, v_BTHV, a_BTHK, b_BTHK, g, initial_state)
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    if g is None:
        g = q_BTHK.new_zeros(B, T, H, dtype=dt)
    scalar = g.dim() == 3
    C = chunk_size if scalar else factorised_chunk_size(g, chunk_size)
    N, prep = cc.chunker(T, C, dt)

    q, k, v, a, b = prep(q_BTHK) * scale, prep(k_BTHK), prep(v_BTHV), prep(a_BTHK), prep(b_BTHK)
    g = prep(g if not scalar else g[..., None])  # [B, H, N, C, K] or [B, H, N, C, 1]
    G = g.cumsum(3)  # inclusive within-chunk log decay
    Ga = G - g if a_pre_decay else G  # log decay the state has seen when a_j reads it

    qd = q * G.exp()  # q_i decayed back to the chunk start
    ad = a * Ga.exp()  # a_i likewise (it reads the state after decay Ga_i)
    if scalar:  # exact relative decays exp(G_i - G_j) as a [C, C] matrix: scalar decays may be arbitrarily strong
        i = torch.arange(C, device=q.device)
        rel_a = (Ga[..., :, None, 0] - G[..., None, :, 0]).masked_fill(i[:, None] <= i[None, :], float("-inf")).exp()
        rel_q = (G[..., :, None, 0] - G[..., None, :, 0]).masked_fill(i[:, None] < i[None, :], float("-inf")).exp()
        A_ab, A_ak = (a @ b.transpose(-1, -2)) * rel_a, (a @ k.transpose(-1, -2)) * rel_a  # [B, H, N, C, C]
        A_qk, A_qb = (q @ k.transpose(-1, -2)) * rel_q, (q @ b.transpose(-1, -2)) * rel_q
    else:  # per-channel decays factorised relative to the chunk start (`factorised_chunk_size`)
        undo = (-G).exp()
        kT, bT = (k * undo).transpose(-1, -2), (b * undo).transpose(-1, -2)
        A_ab, A_ak = (ad @ bT).tril(-1), (ad @ kT).tril(-1)  # j < i
        A_qk, A_qb = (qd @ kT).tril(), (qd @ bT).tril()  # j <= i
    eye = torch.eye(C, dtype=dt, device=q.device)
    L = eye - A_ab
    # U = U0 + W S_0 per chunk, with S_0 the chunk's start state
    U0_BHNCV = torch.linalg.solve_triangular(L, A_ak @ v, upper=False, unitriangular=True)
    W_BHNCK = torch.linalg.solve_triangular(L, ad, upper=False, unitriangular=True)
    o_intra = A_qk @ v + A_qb @ U0_BHNCV
    Q_BHNCK = qd + A_qb @ W_BHNCK  # everything that multiplies S_0 in the output

    G_last = G[..., -1:, :]
    to_end = (G_last - G).exp()  # decay from token i to the chunk's end
    KV_BHNKV = (k * to_end).transpose(-1, -2) @ v  # the chunk's key-value contribution to its end state
    bd_BHNCK = b * to_end
    decay_BHNK = G_last[..., 0, :].exp()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for n in range(N):
        outs.append(o_intra[:, :, n] + Q_BHNCK[:, :, n] @ S)
        U = U0_BHNCV[:, :, n] + W_BHNCK[:, :, n] @ S
        S = decay_BHNK[:, :, n, :, None] * S + KV_BHNKV[:, :, n] + bd_BHNCK[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outs, dim=2)  # [B, H, N, C, V]
    return o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T], S


def recurrent_dplr(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    a_BTHK: Tensor,
    b_BTHK: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    a_pre_decay: bool = False,
) -> tuple[Tensor, Tensor]:
    """Token loop of the DPLR recurrence (module docstring); float32 state.
    Returns o `[B, T, H, V]` and S `[B, H, K, V]` in the accumulation dtype."""
    dt = cc.acc_dtype(q_BTHK, k_BTHK, v_BTHV, a_BTHK, b_BTHK, g, initial_state)
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    q, k, v, a, b = (x.to(dt) for x in (q_BTHK, k_BTHK, v_BTHV, a_BTHK, b_BTHK))
    if g is not None and g.dim() == 3:
        g = g[..., None]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dt)
    outs = []
    for t in range(T):
        D = None if g is None else g[:, t].to(dt).exp()[..., None]  # [B, H, K|1, 1]
        X = S if (a_pre_decay or D is None) else D * S
        aX = (a[:, t, :, :, None] * X).sum(-2, keepdim=True)  # [B, H, 1, V]
        S = (S if D is None else D * S) + b[:, t, :, :, None] * aX + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * (q[:, t, :, :, None] * S).sum(-2))
    o = torch.stack(outs, dim=1) if T else v.new_zeros(B, 0, H, V)
    return o, S


def run_dplr(
    engine: Callable[..., tuple[Tensor, Tensor]],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    g: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    state_v_first: bool = False,
    **opts,
) -> tuple[Tensor, Tensor | None]:
    """Call `engine` (`chunk_dplr` or `recurrent_dplr`) the way the public ops do: packed documents, optional
    `[V, K]` state layout; o in v's dtype, the state (accumulation dtype) only when asked for."""
    h0 = initial_state.transpose(-1, -2) if (state_v_first and initial_state is not None) else initial_state

    def fn(q_: Tensor, k_: Tensor, v_: Tensor, a_: Tensor, b_: Tensor, g_: Tensor | None) -> tuple[Tensor, Tensor]:
        return engine(q_, k_, v_, a_, b_, g_, scale, h0, **opts)

    o, s = cc.packed(fn, cu_seqlens, q, k, v, a, b, g)
    if not output_final_state:
        return o.to(v.dtype), None
    return o.to(v.dtype), (s.transpose(-1, -2) if state_v_first else s)
