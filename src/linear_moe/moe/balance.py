"""Load-balancing terms: expert- and device-level balance losses, router z-loss, aux-loss-free bias update."""

from __future__ import annotations

import torch
import torch.distributed as dist

from linear_moe.moe.dispatch import expert_counts


def expert_fraction(experts_TK: torch.Tensor, num_experts: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """f [E]: fraction of the T*k routing slots that chose each expert (sums to 1). With `group`, the slots of
    every rank of the process group count (the fraction a single process holding all their tokens sees)."""
    counts_E = expert_counts(experts_TK, num_experts)
    if group is None:
        return counts_E.float() / max(experts_TK.numel(), 1)
    counts_E1 = torch.cat([counts_E, counts_E.new_full((1,), experts_TK.numel())])
    dist.all_reduce(counts_E1, group=group)
    return counts_E1[:-1].float() / counts_E1[-1].clamp_min(1).float()


def balance_probs(scores_TE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Per-token probabilities the balance loss averages: softmax scores, or sigmoid scores normalised to sum 1
    (DeepSeek-V3 eq. 18)."""
    if score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def balance_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch arXiv:2101.03961; = DeepSeek-V2's L_ExpBal / alpha1, arXiv:2405.04434):
    f_i fraction of routing slots to expert i, P_i mean probability of expert i. 1 when perfectly uniform.
    With `group`, f counts every rank's slots; P stays this rank's, so the mean of the ranks' losses is the loss
    of all their tokens together."""
    E = probs_TE.shape[-1]
    return E * (expert_fraction(experts_TK, E, group) * probs_TE.mean(0)).sum()


def seq_balance_loss(probs_BTE: torch.Tensor, experts_BTK: torch.Tensor) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20): `balance_loss` per row, averaged over rows."""
    return torch.stack([balance_loss(p, e) for p, e in zip(probs_BTE, experts_BTK, strict=True)]).mean()


def device_balance_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, num_devices: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """DeepSeek-V2 device-level balance loss / alpha2 (arXiv:2405.04434 eq. 14-16): experts split contiguously
    into `num_devices` groups; sum_d mean_{i in d}(E * f_i) * sum_{i in d} P_i. 1 when uniform. `group`: as in
    `balance_loss`."""
    E = probs_TE.shape[-1]
    f_DG = (E * expert_fraction(experts_TK, E, group)).view(num_devices, -1)
    p_DG = probs_TE.mean(0).view(num_devices, -1)
    return (f_DG.mean(-1) * p_DG.sum(-1)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE arXiv:2202.08906 eq. 5): mean over tokens of logsumexp(logits)^2."""
    return logits_TE.float().logsumexp(-1).square().mean()


@torch.no_grad()
def update_expert_bias(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing (DeepSeek-V3 arXiv:2412.19437 Sec. 2.1.2), in place:
    bias += rate * sign(mean(load) - load): overloaded experts get less likely to be selected."""
    load_E = load_E.to(bias_E.device, torch.float32)
    bias_E += rate * torch.sign(load_E.mean() - load_E)
