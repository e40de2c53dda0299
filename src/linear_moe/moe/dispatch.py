"""Token dispatch: sort (token, expert) assignments by expert, optional capacity dropping, combine back.

`MoELayer` reaches this through a `TokenDispatcher` object: `LocalDispatcher` (every expert on this rank) here,
`AllToAllDispatcher` (experts split over expert-parallel ranks) in `moe/all_to_all.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from linear_moe.moe import kernels
from linear_moe.moe.router import Routing


@dataclass
class Dispatch:
    token_N: torch.Tensor  # source token of each kept assignment, sorted by expert (stable)
    slot_N: torch.Tensor  # index into the flat [T * k] assignments (for its router weight)
    counts_E: torch.Tensor  # kept assignments per expert (int64)
    top_k: int  # assignments per token (slot_N indexes the flat [T * top_k] assignments)
    # [T * top_k] position in dispatch order of each flat assignment, -1 where dropped: the row map of the Triton
    # combine (`moe/kernels.py`), which serves both cases with one kernel
    row_Tk: torch.Tensor
    dropless: bool  # no assignment dropped (no capacity limit)

    @property
    def inverse_Tk(self) -> torch.Tensor | None:
        """The inverse permutation of slot_N when nothing is dropped (then returning rows to their (token, slot)
        places is a gather): `row_Tk`; None when some are."""
        return self.row_Tk if self.dropless else None

    @property
    def kept(self) -> torch.Tensor:
        """Scalar int64: assignments kept by the capacity limit (all T * k when dropless)."""
        return self.counts_E.sum()


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 number of entries of `experts` equal to each expert id (bincount without bincount's host sync)."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """ceil(capacity_factor * tokens * k / E) (GShard arXiv:2006.16668 / Switch arXiv:2101.03961)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def dispatch(
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None = None,
    drop_policy: str = "weight",
) -> Dispatch:
    """Sort the T*k assignments by expert (argsort of the flat expert ids; within an expert, by token position).

    With `capacity_factor`, each expert keeps at most `expert_capacity(...)` assignments: the highest router weights
    (`drop_policy="weight"`, ties by position) or the earliest tokens (`"position"`); the rest are dropped (their
    tokens get no contribution from that expert, and only the residual path when all k are dropped).
    """
    T, k = experts_TK.shape
    flat_N = experts_TK.reshape(-1)
    if capacity_factor is not None and drop_policy == "weight":
        by_weight = torch.argsort(weights_TK.reshape(-1), descending=True, stable=True)
        slot_N = by_weight[torch.argsort(flat_N[by_weight], stable=True)]
    else:
        slot_N = torch.argsort(flat_N, stable=True)
    counts_E = expert_counts(flat_N, num_experts)
    if capacity_factor is not None:
        cap = expert_capacity(T, k, num_experts, capacity_factor)
        expert_N = flat_N[slot_N]
        rank_N = torch.arange(slot_N.numel(), device=slot_N.device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_N]
        keep_N = rank_N < cap
        slot_N = slot_N[keep_N]
        if drop_policy == "weight":  # kept rows back in position order within each expert
            slot_N = slot_N[torch.argsort(flat_N[slot_N] * (T * k) + slot_N)]
        counts_E = counts_E.clamp(max=cap)
        row_Tk = torch.full_like(flat_N, -1).scatter_(0, slot_N, torch.arange(slot_N.numel(), device=slot_N.device))
        return Dispatch(slot_N // k, slot_N, counts_E, k, row_Tk, dropless=False)
    inverse_Tk = torch.empty_like(slot_N).scatter_(0, slot_N, torch.arange(T * k, device=slot_N.device))
    return Dispatch(slot_N // k, slot_N, counts_E, k, inverse_Tk, dropless=True)


def to_slots(y_ND: torch.Tensor, slot_N: torch.Tensor, inverse_Tk: torch.Tensor | None, num_slots: int) -> torch.Tensor:
    """[N, D] rows in dispatch order -> [T * k, D] in (token, slot) order, zero rows for dropped assignments.

    Dropless (`inverse_Tk` given), a gather by the inverse permutation; with drops, a scatter into zeros. Neither
    has duplicate indices, so no atomics: deterministic on GPU, and cheaper than autograd's accumulating backward
    of indexing.
    """
    if inverse_Tk is not None:
        return y_ND.index_select(0, inverse_Tk)
    return y_ND.new_zeros(num_slots, y_ND.shape[-1]).index_copy_(0, slot_N, y_ND)


class _ToSlots(torch.autograd.Function):
    """`to_slots` with its backward: the gather of the kept slots' gradient rows."""

    @staticmethod
    def forward(ctx, y_ND, slot_N, inverse_Tk, num_slots: int):
        ctx.save_for_backward(slot_N)
        return to_slots(y_ND, slot_N, inverse_Tk, num_slots)

    @staticmethod
    def backward(ctx, g_TkD: torch.Tensor):
        (slot_N,) = ctx.saved_tensors
        return g_TkD.index_select(0, slot_N), None, None, None


class _GatherRows(torch.autograd.Function):
    """x[token_N] for the kept assignments, with a deterministic backward that needs no atomics or sort: each
    gradient row goes back to its (token, slot) place (`to_slots`) and the k slots of each token are summed; with
    the Triton kernels (`kernels.use_moe_kernels`) both in one gather-sum over the row map `row_Tk`.
    Autograd's own backward of `x[idx]` is an accumulating index_put (sort + atomics on GPU)."""

    @staticmethod
    def forward(ctx, x_TD, token_N, slot_N, row_Tk, dropless: bool, k: int):
        # row_Tk is inverse_Tk when dropless: passed once (dynamo refuses one tensor in two inputs of a Function)
        ctx.save_for_backward(slot_N, row_Tk)
        ctx.T, ctx.k, ctx.dropless = x_TD.shape[0], k, dropless
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        slot_N, row_Tk = ctx.saved_tensors
        if kernels.use_moe_kernels(g_ND):
            return kernels.gather_sum(g_ND, row_Tk.view(ctx.T, ctx.k), None), None, None, None, None, None
        g_TkD = to_slots(g_ND, slot_N, row_Tk if ctx.dropless else None, ctx.T * ctx.k)
        return g_TkD.view(ctx.T, ctx.k, -1).sum(1), None, None, None, None, None


def gather_rows(x_TD: torch.Tensor, d: Dispatch) -> torch.Tensor:
    """[T, D] -> [N, D]: the source token row of every kept assignment, in dispatch (expert-sorted) order."""
    return _GatherRows.apply(x_TD, d.token_N, d.slot_N, d.row_Tk, d.dropless, d.top_k)


def combine(y_ND: torch.Tensor, d: Dispatch, weights_TK: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum over kept assignments (t, e) of weight(t, e) * y_e(t): [N, D] -> [T, D]; weights None: the
    plain sum (the experts applied the weights to their rows: `LocalDispatcher.row_weights`).

    On CUDA with triton (`kernels.use_moe_kernels`; off with `LINEAR_MOE_MOE_KERNELS=0`): one Triton kernel
    reads each token's k rows through the row map `d.row_Tk` and writes the weighted sum (float32 accumulation,
    weights in their own dtype), and one kernel computes the backward (dy by a scatter of distinct rows, dw by a
    float32 dot); nothing is copied to (token, slot) order or saved beyond y itself (`moe/kernels.py`).

    Otherwise (CPU, or switched off): the rows go back to their (token, slot) places (`to_slots`: a gather when
    nothing is dropped, dropped slots zero otherwise), and one batched [1, k] x [k, D] product per token applies
    the router weights (cast to y's dtype) and sums over the k experts. Measured on the H200 (T=65,536, k=8,
    D=1024, bf16, fwd+bwd): this bmm 3.3 ms; an elementwise product and sum 4.8 ms; the same torch.compile'd
    2.3 ms (plus the gather); a gather fused into the weighted sum through torch.compile'd pieces 4.9 ms. The
    ideal (one read of the rows, one write) is ~1 ms. The kernels, measured the same way (`linear-moe bench moe`,
    token gather + combine fwd+bwd): 1.81 ms against 5.96 ms for this path (12-02).
    """
    T, k = d.row_Tk.numel() // d.top_k, d.top_k
    if kernels.use_moe_kernels(y_ND):
        return kernels.gather_sum(y_ND, d.row_Tk.view(T, k), weights_TK)
    y_TkD = _ToSlots.apply(y_ND, d.slot_N, d.inverse_Tk, T * k).view(T, k, -1)
    if weights_TK is None:  # rows weighted by the experts (`row_weights`)
        return y_TkD.sum(1)
    return torch.bmm(weights_TK.to(y_ND.dtype).unsqueeze(1), y_TkD).squeeze(1)


def permute_rows(x_ND: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    """x[order_N] for a permutation `order_N` whose inverse is `inverse_N`; its backward is the gather by the
    inverse (no accumulating scatter). `_ToSlots` with nothing dropped is exactly this gather pair."""
    return _ToSlots.apply(x_ND, inverse_N, order_N, x_ND.shape[0])


class TokenDispatcher(Protocol):
    """How `MoELayer` brings token rows to its experts and back.

    `dispatch(x [T, D], routing) -> (rows [M, D], counts [E_local], ctx)`: the rows the local experts compute,
    grouped by local expert (`counts` rows each). `combine(y [M, D], ctx, weights [T, K] | None) -> [T, D]`: the
    expert outputs back at their tokens, weighted by the router and summed over the k slots (weights None: the
    rows are already weighted, only summed). `ctx.kept` counts this rank's assignments that survived the capacity
    limit.

    Two optional capabilities let the experts keep less for backward (`GroupedExperts.forward`), None where the
    dispatcher cannot offer them: `row_weights(ctx, weights [T, K]) -> [M]`, the router weight of each row, for the
    experts to apply (then combine gets None); `row_source(x [T, D], ctx) -> (x, token [M])`, rows == x[token].
    """

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_MD: torch.Tensor, ctx: Any, weights_TK: torch.Tensor | None) -> torch.Tensor: ...

    def row_weights(self, ctx: Any, weights_TK: torch.Tensor) -> torch.Tensor | None: ...

    def row_source(self, x_TD: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class LocalDispatcher:
    """Every expert lives on this rank: the rows are this rank's assignments sorted by expert (`dispatch`)."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None, drop_policy: str = "weight"):
        self.num_experts, self.capacity_factor, self.drop_policy = num_experts, capacity_factor, drop_policy

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, Dispatch]:
        d = dispatch(routing.experts_TK, routing.weights_TK, self.num_experts, self.capacity_factor, self.drop_policy)
        return gather_rows(x_TD, d), d.counts_E, d

    def combine(self, y_ND: torch.Tensor, ctx: Dispatch, weights_TK: torch.Tensor | None) -> torch.Tensor:
        return combine(y_ND, ctx, weights_TK)

    def row_weights(self, ctx: Dispatch, weights_TK: torch.Tensor) -> torch.Tensor:
        return weights_TK.reshape(-1).index_select(0, ctx.slot_N)

    def row_source(self, x_TD: torch.Tensor, ctx: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
        return x_TD, ctx.token_N
