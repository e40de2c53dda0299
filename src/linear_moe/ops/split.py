"""One long sequence through pieces run side by side (issue 15): the chunked ops of the diagonal-decay families
(gla, simple_gla) with the sequence cut into pieces of `piece_len` tokens that run as batch rows, or, for packed
documents (`cu_seqlens`), as extra sequences of a refined `cu_seqlens`.

Why: fla's chunk kernels pass the state through a sequence chunk by chunk, one program per (sequence, head, block).
At one sequence and 8 heads that is a few dozen programs on an H200's 132 SMs, so one 65,536-token row costs 3x the
same tokens as 32 rows of 2,048 (docs/benchmarks.md). Pieces as sequences give the state pass P times the programs.

The recurrence S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T is affine in its initial state: a piece p that starts
from S0_p ends at  exp(G_p) * S0_p + S_p, where G_p = sum of the log decays w over the piece (per key channel for
gla, per head for simple_gla) and S_p the piece's final state from zeros. So (the single-device form of the
LASP-2-style combine in `parallel/cp.py`, without collectives and without probe runs):

 1. local states: S_p of every piece that hands its state on (`local="op"`: the chunk op on those pieces from
    zero states, its outputs unused; `local="sum"`: the closed form S_p = sum_t (k_t * exp(G_p - W_t))^T v_t with
    W_t the inclusive sum of w within the piece, one batched matmul in the accumulation dtype);
 2. a scan over the pieces: S0_0 = initial_state (or zeros), S0_{p+1} = exp(G_p) * S0_p + S_p
    (log2(P) elementwise steps, no matmul, so autocast cannot round it);
 3. the chunk op on the pieces from S0_p gives every output exactly, and the last piece's final state is the
    sequence's.

Rows `[B, T]`: P = ceil(T / piece_len) pieces per row run as B*P batch rows; the end of a row is padded with zero
q, k, v and zero log decay, which leaves the state unchanged, and the padded outputs are dropped.

Packed documents (`cu_seqlens`, B == 1): every document longer than `piece_len` is cut into pieces of `piece_len`
tokens from its start (the last one shorter), shorter documents stay whole. Step 1 runs on the full pieces that
hand a state on (every piece but a document's last), gathered into a `[P1, piece_len]` batch; step 2 is one flat
scan over the pieces of the cut documents, reset at each document's start (factor exp(-inf) = 0, then the
document's initial state); step 3 is the op once over the whole row with the refined `cu_seqlens` and a start
state per piece, and each document's final state is its last piece's. The refined offsets and the index tensors
(`VarlenPlan`) come from the offsets on the host: one device-to-host copy of `cu_seqlens` (a sync) the first time
a `cu_seqlens` tensor is seen, none when the caller passes `cu_seqlens_cpu`; the plan is cached for that tensor,
so every layer of a forward (and a checkpointed recompute) reuses it, and fla gets the refined offsets on the host
too (`cu_seqlens_cpu`), so its chunk indices need no sync either.

Autograd runs through all three steps (fla's chunk ops take gradients of initial_state and of the final state), so
the gradients are the unsplit op's. Cost on the GPU: the chunk op twice over the pieces that hand a state on and
once over the rest (`local="op"`), or once plus a matmul (`local="sum"`, which keeps float32 copies of those
pieces' k and v for its backward); measured speed in docs/ops.md.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
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


def affine_scan(a_BPX: Tensor, b_BPHKV: Tensor) -> Tensor:
    """Inclusive scan along dim 1 of the affine maps (a_p, b_p): S -> exp(a_p) * S + b_p, applied in order p = 0,
    1, ...: element p of the result is b_p + exp(a_p) b_{p-1} + exp(a_p + a_{p-1}) b_{p-2} + ..., i.e. the state
    after the maps 0..p from a zero state. `a_BPX` broadcastable to `b_BPHKV` (log factors <= 0, -inf for a reset).
    Hillis-Steele: log2(P) elementwise steps."""
    a, b = a_BPX, b_BPHKV
    d = 1
    while d < b.shape[1]:  # after this step, element p holds the composition of elements p-2d+1 .. p
        b = torch.cat([b[:, :d], b[:, d:] + a[:, d:].exp() * b[:, :-d]], 1)
        a = torch.cat([a[:, :d], a[:, d:] + a[:, :-d]], 1)
        d *= 2
    return b


def scan_states(decay_BPX: Tensor | None, local_BPHKV: Tensor, s0_BHKV: Tensor | None) -> Tensor:
    """The state each piece starts from, `[B, P, H, K, V]`: S0_0 = s0 (zeros when None) and
    S0_{p+1} = exp(decay_p) * S0_p + local_p, with `decay_BPX` the pieces' summed log decays broadcastable to
    `[B, P, H, K, 1]` (None: no decay): `affine_scan` over the elements (0, s0), (decay_0, local_0), ...,
    (decay_{P-2}, local_{P-2}); every exponent is a sum of log decays, so it is <= 0 and the factors stay in
    [0, 1]."""
    s0 = local_BPHKV.new_zeros(local_BPHKV[:, :1].shape) if s0_BHKV is None else s0_BHKV[:, None]
    dt = torch.promote_types(s0.dtype, local_BPHKV.dtype)
    b = torch.cat([s0.to(dt), local_BPHKV[:, :-1].to(dt)], 1)
    if decay_BPX is None:
        return b.cumsum(1)
    return affine_scan(torch.cat([torch.zeros_like(decay_BPX[:, :1]), decay_BPX[:, :-1]], 1), b)


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


def _local_states(
    op: Any, pieces: dict[str, Tensor], other: dict[str, Any], w: Tensor | None, local: str
) -> tuple[Tensor, Tensor]:
    """Step 1 on rows of whole pieces `[P, L, ...]`: (their final states from zeros `[P, H, K, V]`, their summed
    log decays `[P, H, K|1, 1]`, zeros without decay)."""
    if local == "op":  # the pieces' outputs are unused: q takes no gradient from this run
        _, s = op(**{**pieces, "q": pieces["q"].detach()}, **other, output_final_state=True)
    else:
        s = local_states_sum(pieces["k"], pieces["v"], w)
    if w is None:
        return s, s.new_zeros(s.shape[0], 1, 1, 1)
    return s, w.to(acc_dtype(w, s)).sum(1)[..., None]


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
    """Run `op(**time_args, **other, initial_state, output_final_state)` over rows cut into pieces of `piece_len`
    tokens (module docstring). `w_BTHX`: the per-token log decay broadcastable per key channel (`[B, T, H, K|1]`)
    or None."""
    q = time_args["q"]
    B, T = q.shape[:2]
    P = -(-T // piece_len)
    if P <= 1:
        return op(**time_args, **other, initial_state=initial_state, output_final_state=output_final_state)
    L = piece_len
    pieces = {n: _pieces(t, P, L) for n, t in time_args.items()}
    w = _pieces(w_BTHX, P, L)
    s, decay = _local_states(op, pieces, other, w, local)
    s0_BPHKV = scan_states(decay.unflatten(0, (B, P)), s.unflatten(0, (B, P)), initial_state)
    o, s_final = op(
        **pieces, **other, initial_state=s0_BPHKV.flatten(0, 1).contiguous(), output_final_state=output_final_state
    )
    o_BTHV = o.unflatten(0, (B, P)).flatten(1, 2)[:, :T]
    return o_BTHV, (s_final.unflatten(0, (B, P))[:, -1] if output_final_state else None)


# ---- packed documents ----


@dataclass(frozen=True)
class VarlenPlan:
    """The index work of splitting packed documents (N documents, S refined segments, P1 pieces handing a state
    on, M pieces of the cut documents, F cut documents), device tensors unless said otherwise.

    cu / cu_cpu: the refined offsets `[S+1]` (cu_seqlens' dtype) on the device and on the host.
    docs_cpu: the documents' offsets `[N+1]` on the host (fla's `cu_seqlens_cpu` when nothing is cut).
    carry_PL: the token positions `[P1, L]` of the pieces that hand a state on (full pieces, in order).
    first_F: the cut documents `[F]` (whose initial states start the scan).
    a_M, b_M: per scanned piece, its row of [-inf, G_0 .. G_{P1-1}] and of [first states (F), S_0 .. S_{P1-1}].
    s0_h0_S, s0_zero_S: per segment, its start state's row of [initial_state (N), scanned (M)] or
        [zeros (1), scanned (M)].
    last_N: each document's last segment.
    """

    cu: Tensor
    cu_cpu: Tensor
    docs_cpu: Tensor
    carry_PL: Tensor
    first_F: Tensor
    a_M: Tensor
    b_M: Tensor
    s0_h0_S: Tensor
    s0_zero_S: Tensor
    last_N: Tensor

    @property
    def cuts(self) -> bool:
        """Whether any document is longer than a piece (otherwise the op runs on the documents as they are)."""
        return len(self.cu_cpu) > len(self.docs_cpu)


def build_varlen_plan(docs_cpu: Tensor, piece_len: int, T: int, device: torch.device) -> VarlenPlan:
    """The plan for documents at host offsets `docs_cpu [N+1]` (over T tokens) cut into pieces of `piece_len`
    tokens (host arithmetic, no Python loop; the index tensors are copied to `device` once)."""
    L, cu = piece_len, docs_cpu.long()
    N = len(cu) - 1
    lens_N = cu.diff()
    if N < 1 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((lens_N < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing offsets from 0 to T={T}, got {docs_cpu.tolist()}")
    n_N = (lens_N + L - 1).div(L, rounding_mode="floor").clamp_min(1)  # pieces per document
    S = int(n_N.sum())
    first_seg_N = n_N.cumsum(0) - n_N
    doc_S = torch.repeat_interleave(torch.arange(N), n_N, output_size=S)
    piece_S = torch.arange(S) - first_seg_N[doc_S]
    start_S = cu[:-1][doc_S] + piece_S * L
    refined_cpu = torch.cat([start_S, cu[-1:]]).to(docs_cpu.dtype)
    cut_S = n_N[doc_S] > 1  # a piece of a cut document
    carry_S = piece_S < n_N[doc_S] - 1  # hands a state on (all but a document's last piece)
    carry_rank_S = carry_S.long().cumsum(0) - 1
    cut_N = n_N > 1
    cut_rank_N = cut_N.long().cumsum(0) - 1
    F_ = int(cut_N.sum())
    seg_M = cut_S.nonzero().squeeze(1)
    first_M = piece_S[seg_M] == 0
    prev_carry_M = carry_rank_S[seg_M - 1]  # the piece before (meaningless where first_M)
    elem_S = cut_S.long().cumsum(0) - 1  # the piece's place among the scanned ones
    to = {"device": device}
    return VarlenPlan(
        cu=refined_cpu.to(**to),
        cu_cpu=refined_cpu,
        docs_cpu=docs_cpu,
        carry_PL=(start_S[carry_S][:, None] + torch.arange(L)).to(**to),
        first_F=cut_N.nonzero().squeeze(1).to(**to),
        a_M=torch.where(first_M, 0, 1 + prev_carry_M).to(**to),
        b_M=torch.where(first_M, cut_rank_N[doc_S[seg_M]], F_ + prev_carry_M).to(**to),
        s0_h0_S=torch.where(cut_S, N + elem_S, doc_S).to(**to),
        s0_zero_S=torch.where(cut_S, 1 + elem_S, 0).to(**to),
        last_N=(first_seg_N + n_N - 1).to(**to),
    )


_PLANS: OrderedDict[tuple[int, int, int], tuple[weakref.ref, int, VarlenPlan]] = OrderedDict()
_PLANS_KEPT = 8  # a few cu_seqlens tensors (forward, checkpointed recompute, a second piece length)


@torch.compiler.disable  # host work on a cache: under torch.compile (parallel.compile) one graph break here
def varlen_plan(cu_seqlens: Tensor, piece_len: int, T: int, cu_seqlens_cpu: Tensor | None = None) -> VarlenPlan:
    """The `VarlenPlan` of the offsets `cu_seqlens` (device), cached for this tensor object: the layers of one
    forward share their `cu_seqlens`, so only the first builds the plan. Building reads the offsets on the host:
    `cu_seqlens_cpu` when given, else one device-to-host copy (`.cpu()`, a sync on CUDA). The entry goes when the
    tensor does (or after `_PLANS_KEPT` newer ones)."""
    version = -1 if cu_seqlens.is_inference() else cu_seqlens._version  # inference tensors keep no version
    key = (id(cu_seqlens), piece_len, T)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == version:
        return hit[2]
    source = cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu
    docs_cpu = source.to("cpu", copy=True)  # the one host sync (a copy: the plan must not keep cu_seqlens alive)
    plan = build_varlen_plan(docs_cpu, piece_len, T, cu_seqlens.device)
    _PLANS[key] = (weakref.ref(cu_seqlens, lambda _, plans=_PLANS: plans.pop(key, None)), version, plan)
    while len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def _split_varlen(
    op: Any,
    time_args: dict[str, Tensor | None],
    other: dict[str, Any],
    w_1THX: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    plan: VarlenPlan,
    local: str,
) -> tuple[Tensor, Tensor | None]:
    """`_split` for packed documents `[1, T, ...]` (module docstring) with `plan`'s pieces."""
    gathered = {n: t[0, plan.carry_PL] for n, t in time_args.items() if n != "q" and t is not None}
    gathered["q"] = gathered["k"]  # step 1's outputs are unused (and detached there): k saves gathering q
    w = None if w_1THX is None else w_1THX[0, plan.carry_PL]
    s_PHKV, decay_PX = _local_states(op, gathered, other, w, local)
    dt = torch.promote_types(s_PHKV.dtype, initial_state.dtype) if initial_state is not None else s_PHKV.dtype
    H, K, V = s_PHKV.shape[1:]
    h0 = None if initial_state is None else initial_state.to(dt)
    first = s_PHKV.new_zeros(len(plan.first_F), H, K, V, dtype=dt) if h0 is None else h0[plan.first_F]
    b_M = torch.cat([first, s_PHKV.to(dt)])[plan.b_M]
    reset = decay_PX.new_full((1, *decay_PX.shape[1:]), -torch.inf)  # a document's start: factor exp(-inf) = 0
    a_M = torch.cat([reset, decay_PX])[plan.a_M]
    scanned_M = affine_scan(a_M[None], b_M[None])[0]
    if h0 is None:
        s0_S = torch.cat([scanned_M.new_zeros(1, H, K, V), scanned_M])[plan.s0_zero_S]
    else:
        s0_S = torch.cat([h0, scanned_M])[plan.s0_h0_S]
    o, s_S = op(
        **time_args,
        **other,
        initial_state=s0_S,
        output_final_state=output_final_state,
        cu_seqlens=plan.cu,
        cu_seqlens_cpu=plan.cu_cpu,
    )
    return o, (s_S[plan.last_N] if output_final_state else None)


def _run(
    op: Any,
    time_args: dict[str, Tensor | None],
    other: dict[str, Any],
    w_BTHX: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    cu_seqlens_cpu: Tensor | None,
    piece_len: int,
    local: str,
) -> tuple[Tensor, Tensor | None]:
    """Rows, packed documents with one longer than a piece, or (nothing to cut) the op itself."""
    if cu_seqlens is None:
        return _split(op, time_args, other, w_BTHX, initial_state, output_final_state, piece_len, local)
    state = {"initial_state": initial_state, "output_final_state": output_final_state}
    if time_args["q"].shape[1] <= piece_len:  # no document can be cut: no plan, no host sync
        return op(**time_args, **other, **state, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu)
    plan = varlen_plan(cu_seqlens, piece_len, time_args["q"].shape[1], cu_seqlens_cpu)
    if not plan.cuts:
        return op(**time_args, **other, **state, cu_seqlens=cu_seqlens, cu_seqlens_cpu=plan.docs_cpu)
    return _split_varlen(op, time_args, other, w_BTHX, initial_state, output_final_state, plan, local)


def _check(name: str, op: Any, piece_len: int, local: str, *args: Any, **kw: Any) -> None:
    """The op's own input checks (packing included), then the split's: a positive `piece_len`, a known `local`."""
    op.check(name, bind(op.__signature__, args, kw))
    if not isinstance(piece_len, int) or piece_len < 1:
        raise ValueError(f"{name}: piece_len must be a positive number of tokens, got {piece_len!r}")
    if local not in LOCAL:
        raise ValueError(f"{name}: local must be one of {', '.join(LOCAL)}, got {local!r}")


def chunk_gla_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    *,
    piece_len: int,
    local: str = "op",
) -> tuple[Tensor, Tensor | None]:
    """`gla.chunk_gla` (fla's kernel on CUDA, our PyTorch form elsewhere) of rows `[B, T, H, *]` or packed
    documents (`cu_seqlens [N+1]`, B == 1, initial and final states `[N, H, K, V]`) computed through pieces of
    `piece_len` tokens run side by side: the same output `[B, T, H, V]`, final state and gradients (module
    docstring). `local`: "op" or "sum", how the pieces' own final states are found. `cu_seqlens_cpu`: the offsets
    on the host, which saves the one sync of building the pieces."""
    _check("chunk_gla_split", gla.chunk_gla, piece_len, local, q, k, v, g, scale, initial_state, cu_seqlens=cu_seqlens)
    return _run(
        gla.chunk_gla,
        {"q": q, "k": k, "v": v, "g": g},
        {"scale": scale},
        g,
        initial_state,
        output_final_state,
        cu_seqlens,
        cu_seqlens_cpu,
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
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    *,
    piece_len: int,
    local: str = "op",
) -> tuple[Tensor, Tensor | None]:
    """`simple_gla.chunk_simple_gla` (per-head decay `g [B, T, H]` and/or `g_gamma [H]`: RetNet, Lightning,
    Mamba2's SSD) computed through pieces of `piece_len` tokens, as `chunk_gla_split`. The pieces run with
    g = g + g_gamma (fla's data-dependent decay path) and g_gamma unset."""
    args = (q, k, v, g, g_gamma, scale, initial_state)
    _check("chunk_simple_gla_split", simple_gla.chunk_simple_gla, piece_len, local, *args, cu_seqlens=cu_seqlens)
    # g_gamma folded into g: padding the end then adds no decay, and g_gamma gets its whole gradient on every
    # device (fla's kernels give g_gamma none, so a split run would otherwise give it only the scan's part)
    w_BTH = simple_gla.log_decay(q, g, g_gamma)
    w_BTH = None if w_BTH is None else w_BTH.contiguous()
    return _run(
        simple_gla.chunk_simple_gla,
        {"q": q, "k": k, "v": v, "g": w_BTH},
        {"scale": scale},
        None if w_BTH is None else w_BTH[..., None],
        initial_state,
        output_final_state,
        cu_seqlens,
        cu_seqlens_cpu,
        piece_len,
        local,
    )
