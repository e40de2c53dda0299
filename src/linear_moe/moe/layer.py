"""`MoELayer`: router -> dispatch -> grouped SwiGLU experts -> combine, plus shared experts and aux losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from linear_moe.moe import balance
from linear_moe.moe.config import MoEConfig
from linear_moe.moe.dispatch import LocalDispatcher, TokenDispatcher, expert_counts
from linear_moe.moe.experts import GroupedExperts, SwiGLU
from linear_moe.moe.router import Router, Routing


@dataclass
class MoEAux:
    loss: torch.Tensor  # scalar: weighted sum of the enabled aux losses (add to the LM loss)
    load: torch.Tensor  # [E] float32 tokens routed to each expert in this call (before capacity dropping), detached
    balance: torch.Tensor  # scalar, unweighted (0 when balance_coef == 0)
    device_balance: torch.Tensor  # scalar, unweighted (0 when device_balance_coef == 0)
    z_loss: torch.Tensor  # scalar, unweighted (0 when z_loss_coef == 0)
    dropped: torch.Tensor  # scalar int64: assignments dropped by the capacity limit (a tensor: no host sync)


class MoELayer(nn.Module):
    """Mixture-of-experts SwiGLU FFN: `y [B, T, D], aux = layer(x [B, T, D])`. See docs/moe.md.

    Buffers: `expert_bias [E]` (float32, persistent): aux-loss-free selection bias (DeepSeek-V3 arXiv:2412.19437);
    the trainer calls `update_bias(aux.load)` after each optimizer step (no-op when `bias_update_rate == 0`).

    Scale-out swaps two attributes (see `linear_moe.parallel`): `dispatcher`, the `TokenDispatcher` that brings
    rows to the experts (`LocalDispatcher`; `AllToAllDispatcher` when the experts are split over ranks), and
    `stats_group`, the process group over which the balance losses count expert assignments (None: this rank).
    The sequence-wise balance loss (`balance_seq_wise`) counts per training sequence: `seq_len` (tokens, None: each
    input row is one sequence) cuts the rows of packed `[1, B*T]` batches into their sequences, and `seq_group`
    (None: this rank) is the context-parallel group whose ranks hold consecutive slices of the same rows; both are
    set by `linear_moe.parallel.parallelize` (`parallel/ep.py: apply_global_stats`).
    Another, `recompute_chunk` (tokens, None: off), is set by `train.expert_chunk` (`parallel/checkpointing.py`):
    the routed experts then run on the tokens in chunks of that many, each chunk recomputed in backward, so their
    activations exist for one chunk at a time (what lets 1M-token sequences fit; the router still sees all tokens).
    """

    def __init__(self, cfg: MoEConfig, hidden_size: int, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg, hidden_size)
        self.experts = GroupedExperts(cfg.num_experts, hidden_size, cfg.expert_ffn_hidden_size, backend)
        self.shared_experts = SwiGLU(hidden_size, cfg.shared_ffn_size) if cfg.shared_ffn_size else None
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False)
            if cfg.shared_expert_gate and self.shared_experts is not None
            else None
        )
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.num_experts, cfg.capacity_factor, cfg.drop_policy)
        self.stats_group: torch.distributed.ProcessGroup | None = None
        self.seq_len: int | None = None
        self.seq_group: torch.distributed.ProcessGroup | None = None
        self.recompute_chunk: int | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) for every weight (as the HF reference models); expert_bias zero."""
        for p in self.parameters():
            nn.init.normal_(p, std=self.cfg.init_std)
        self.expert_bias.zero_()

    def _apply(self, fn, recurse: bool = True):
        """Keep `expert_bias` float32 under `.to(bf16)` / `.half()`: updates of 1e-3 vanish in bf16."""
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """x [B, T, D] -> (y [B, T, D], `MoEAux`). Every token is routed independently (dropless default)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        r = self.router(x_ND, self.expert_bias)
        chunk = self.recompute_chunk
        if chunk is None:
            y_ND, kept = self._routed(x_ND, r.experts_TK, r.weights_TK)
        else:  # every chunk (one when T <= chunk) through `checkpoint`: only its slice of x_ND (a view) is kept
            pieces = [
                checkpoint(
                    self._routed,
                    x_ND[s : s + chunk],
                    r.experts_TK[s : s + chunk],
                    r.weights_TK[s : s + chunk],
                    use_reentrant=False,
                )
                for s in range(0, x_ND.shape[0], chunk)
            ]
            y_ND = torch.cat([y for y, _ in pieces])
            kept = sum(k for _, k in pieces)
        if self.shared_experts is not None:
            shared_ND = self.shared_experts(x_ND)
            if self.shared_expert_gate is not None:
                shared_ND = shared_ND * torch.sigmoid(self.shared_expert_gate(x_ND))
            y_ND = y_ND + shared_ND
        return y_ND.view(B, T, D), self._aux(r, B, kept)

    def _routed(
        self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' weighted sum at each token [N, D], and the assignments kept (capacity limit)."""
        dispatcher = self.dispatcher
        rows_MD, counts_E, ctx = dispatcher.dispatch(x_ND, Routing(None, None, experts_NK, weights_NK))
        # the router weights applied by the experts where the dispatcher can say which row has which (then the
        # combine only sums, and nothing of [N, D] is kept for their gradient; `GroupedExperts.forward`)
        weights_M = dispatcher.row_weights(ctx, weights_NK)
        y_MD = self.experts(rows_MD, counts_E, weights_M, dispatcher.row_source(x_ND, ctx))
        return dispatcher.combine(y_MD, ctx, weights_NK if weights_M is None else None), ctx.kept

    def _aux(self, r: Routing, B: int, kept: torch.Tensor) -> MoEAux:
        cfg = self.cfg
        zero = r.logits_TE.new_zeros(())
        probs_TE = balance.balance_probs(r.scores_TE, cfg.score_func)
        bal = dev = z = zero
        if cfg.balance_coef:
            if cfg.balance_seq_wise:
                bal = balance.seq_balance_loss(probs_TE, r.experts_TK, *self._sequences(B, probs_TE.shape[0] // B))
            else:
                bal = balance.balance_loss(probs_TE, r.experts_TK, self.stats_group)
        if cfg.device_balance_coef:
            dev = balance.device_balance_loss(probs_TE, r.experts_TK, cfg.num_devices, self.stats_group)
        if cfg.z_loss_coef:
            z = balance.z_loss(r.logits_TE)
        loss = cfg.balance_coef * bal + cfg.device_balance_coef * dev + cfg.z_loss_coef * z
        load_E = expert_counts(r.experts_TK, cfg.num_experts).float()
        return MoEAux(loss, load_E, bal.detach(), dev.detach(), z.detach(), r.experts_TK.numel() - kept)

    def _sequences(self, B: int, T: int) -> tuple[torch.Tensor, int, torch.distributed.ProcessGroup | None]:
        """The sequence of each token of this call's [B, T] input, the number of sequences, and the group over which
        they are split (`seq_len`, `seq_group`)."""
        group = self.seq_group
        rank, size = (torch.distributed.get_rank(group), torch.distributed.get_world_size(group)) if group else (0, 1)
        row_N, rows = balance.sequence_rows(B, T, self.seq_len, rank, size, self.expert_bias.device)
        return row_N, rows, group

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """bias += bias_update_rate * sign(mean(load) - load). Call after the optimizer step with `aux.load`
        (summed over micro-batches / data-parallel ranks)."""
        if self.cfg.bias_update_rate:
            balance.update_expert_bias(self.expert_bias, load_E, self.cfg.bias_update_rate)
