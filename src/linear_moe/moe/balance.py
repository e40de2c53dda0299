"""Load-balancing terms: expert- and device-level balance losses, router z-loss, aux-loss-free bias update."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_gather_tensor_autograd

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


def sequence_rows(
    batch: int, length: int, seq_len: int | None, rank: int = 0, size: int = 1, device: torch.device | None = None
) -> tuple[torch.Tensor, int]:
    """(row_N [batch * length] int64, R): the training sequence of each token of an input [batch, length], flat.

    The input is slice `rank` of `size` equal slices along its length (context parallelism; `size=1`: whole rows),
    so input row b is row b of `size * length` tokens, made of sequences of `seq_len` tokens (a shorter last one;
    None: the whole row is one sequence), numbered row by row: R sequences in all, over every slice."""
    row_len = size * length
    seq = min(seq_len or row_len, row_len)
    per_row = -(-row_len // seq)  # ceil: a last partial sequence (a decode step, a short eval row) counts on its own
    pos_L = rank * length + torch.arange(length, device=device)
    row_BL = torch.arange(batch, device=device)[:, None] * per_row + pos_L // seq
    return row_BL.reshape(-1), batch * per_row


def seq_balance_loss(
    probs_NE: torch.Tensor,
    experts_NK: torch.Tensor,
    row_N: torch.Tensor,
    num_rows: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 arXiv:2412.19437 eq. 17-20): `balance_loss` per training sequence,
    averaged over the `num_rows` sequences; token n belongs to sequence `row_N[n]` (`sequence_rows`).

    With `group` (the context-parallel ranks, which hold slices of the same sequences) the sequences' expert counts
    and probability sums [R, E] are summed over the group first, the probabilities' differentiably (each rank's
    tokens get the gradient of every rank's loss), so every rank of the group has the loss of the whole sequences."""
    E, k = probs_NE.shape[-1], experts_NK.shape[-1]
    flat_Nk = (row_N[:, None] * E + experts_NK).reshape(-1)
    counts_RE = expert_counts(flat_Nk, num_rows * E).view(num_rows, E)
    psum_RE = probs_NE.new_zeros(num_rows, E).index_add(0, row_N, probs_NE)
    if group is not None:
        dist.all_reduce(counts_RE, group=group)
        psum_RE = all_gather_tensor_autograd(psum_RE[None], 0, group).sum(0)
    tokens_R1 = (counts_RE.sum(-1, keepdim=True) // k).clamp_min(1)
    f_RE = counts_RE.float() / (tokens_R1 * k).float()
    return (E * (f_RE * psum_RE / tokens_R1.to(psum_RE.dtype)).sum(-1)).mean()


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
