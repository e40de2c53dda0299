"""Token-choice top-k routers: softmax / sigmoid scores, group-limited selection, selection-only expert bias."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.moe.config import MoEConfig


@dataclass
class Routing:
    logits_TE: torch.Tensor  # float32 router logits
    scores_TE: torch.Tensor  # softmax or sigmoid of the logits (no bias)
    experts_TK: torch.Tensor  # int64 selected experts, best first
    weights_TK: torch.Tensor  # float32 combine weights (bias-free scores, renormalised / scaled per config)


def group_limited_mask(sel_TE: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """Bool [T, E]: experts inside the `topk_group` best of `n_group` contiguous groups (DeepSeek-V2/V3).

    group_score "max": a group's best score (arXiv:2405.04434); "top2_sum": sum of its two best scores
    (arXiv:2412.19437; groups of one expert use that expert's score).
    """
    T, E = sel_TE.shape
    sel_TGe = sel_TE.view(T, n_group, E // n_group)
    if group_score == "max":
        group_TG = sel_TGe.amax(-1)
    else:
        group_TG = sel_TGe.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1).indices, True)
    return keep_TG.repeat_interleave(E // n_group, dim=1)


class _Float32Linear(torch.autograd.Function):
    """x @ w.T in float32 for x of any float dtype, keeping x itself (not its float32 copy) for backward: under bf16
    autocast the copy would double what the router keeps ([T, D] float32, 256 MiB a layer at 65,536 tokens)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return F.linear(x_TD.float(), w_ED.float())

    @staticmethod
    def backward(ctx, g_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        dx = (g_TE @ w_ED.float()).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        dw = (g_TE.T @ x_TD.float()).to(w_ED.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


class Router(nn.Module):
    """Linear router in float32: logits = x @ weight.T, weight [E, D] ~ normal(0, init_std)."""

    def __init__(self, cfg: MoEConfig, hidden_size: int):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, hidden_size, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, bias_E: torch.Tensor | None = None) -> Routing:
        """x [T, D] -> `Routing`. `bias_E` shifts only which experts are selected, never their weights."""
        with torch.autocast(x_TD.device.type, enabled=False):  # the router stays float32 under bf16 autocast
            logits_TE = _Float32Linear.apply(x_TD, self.weight)
        return route(logits_TE, self.cfg, bias_E)


def route(logits_TE: torch.Tensor, cfg: MoEConfig, bias_E: torch.Tensor | None = None) -> Routing:
    """Top-k selection from float32 logits [T, E] following `cfg` (see docs/moe.md, "routing")."""
    scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    sel_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
        keep_TE = group_limited_mask(sel_TE, cfg.n_group, cfg.topk_group, cfg.group_score)
        sel_TE = sel_TE.masked_fill(~keep_TE, float("-inf"))
    experts_TK = sel_TE.topk(cfg.top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, experts_TK)
    if cfg.norm_topk_prob:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(logits_TE, scores_TE, experts_TK, weights_TK * cfg.routed_scaling_factor)
