"""`AllToAllDispatcher`: expert parallelism. The E experts of a layer are split over the `ep` ranks of a process
group (rank r holds experts [r * E/ep, (r + 1) * E/ep)); each rank sends every assignment row to the rank holding
its expert and gets the outputs back.

    dispatch: local sort by expert (`LocalDispatcher`) -> exchange the [ep, E/ep] row counts (all_to_all)
              -> exchange the rows (all_to_all of uneven splits, autograd) -> regroup by local expert
    combine:  the inverse: back to source-rank blocks -> all_to_all back -> `combine` at the tokens
    row_weights: each row's router weight sent the rows' way, for the experts to apply (the combine then sums)

The row exchange is `_functional_collectives.all_to_all_single_autograd`, whose backward is the reverse exchange,
so every rank's experts receive the gradients of every rank's tokens. One host sync per call reads the splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from linear_moe.moe.dispatch import Dispatch, LocalDispatcher, combine, permute_rows
from linear_moe.moe.router import Routing


@dataclass
class AllToAllContext:
    local: Dispatch  # this rank's assignments sorted by (global) expert
    send: list[int]  # rows sent to each ep rank
    recv: list[int]  # rows received from each ep rank
    order_M: torch.Tensor  # received rows (by source rank, then expert) -> grouped by local expert
    inverse_M: torch.Tensor

    @property
    def kept(self) -> torch.Tensor:
        return self.local.kept


class AllToAllDispatcher:
    """`TokenDispatcher` over the expert-parallel process group `group` (see the module docstring)."""

    def __init__(
        self,
        num_experts: int,
        group: dist.ProcessGroup,
        capacity_factor: float | None = None,
        drop_policy: str = "weight",
    ):
        self.local = LocalDispatcher(num_experts, capacity_factor, drop_policy)
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.ep} expert-parallel ranks")
        self.num_local = num_experts // self.ep

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, AllToAllContext]:
        rows_ND, counts_E, d = self.local.dispatch(x_TD, routing)
        send_RE = counts_E.view(self.ep, self.num_local)  # rows for each rank's experts
        recv_RE = torch.empty_like(send_RE)
        dist.all_to_all_single(recv_RE, send_RE, group=self.group)  # counts first: the row splits
        send, recv = torch.stack([send_RE.sum(1), recv_RE.sum(1)]).tolist()
        rows_MD = all_to_all_single_autograd(rows_ND, recv, send, self.group)
        # received: one block per source rank, sorted by local expert inside; group them by local expert
        M = sum(recv)
        expert_M = torch.arange(self.num_local, device=x_TD.device).repeat(self.ep)
        expert_M = torch.repeat_interleave(expert_M, recv_RE.reshape(-1), output_size=M)
        order_M = torch.argsort(expert_M, stable=True)
        inverse_M = torch.empty_like(order_M).scatter_(0, order_M, torch.arange(M, device=order_M.device))
        rows_MD = permute_rows(rows_MD, order_M, inverse_M)
        return rows_MD, recv_RE.sum(0), AllToAllContext(d, send, recv, order_M, inverse_M)

    def combine(self, y_MD: torch.Tensor, ctx: AllToAllContext, weights_TK: torch.Tensor | None) -> torch.Tensor:
        y_MD = permute_rows(y_MD, ctx.inverse_M, ctx.order_M)
        y_ND = all_to_all_single_autograd(y_MD, ctx.send, ctx.recv, self.group)
        return combine(y_ND, ctx.local, weights_TK)

    def row_weights(self, ctx: AllToAllContext, weights_TK: torch.Tensor) -> torch.Tensor:
        """The router weight of each received row: the weights travel the rows' way (one more all_to_all, of N
        floats; its backward brings their gradients home), so the experts apply them and the combine only sums."""
        w_N = self.local.row_weights(ctx.local, weights_TK)
        w_M = all_to_all_single_autograd(w_N, ctx.recv, ctx.send, self.group)
        return permute_rows(w_M[:, None], ctx.order_M, ctx.inverse_M)[:, 0]

    def row_source(self, x_TD: torch.Tensor, ctx: AllToAllContext) -> None:
        """None: the rows came from other ranks."""
        return None
