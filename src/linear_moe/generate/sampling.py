"""Choosing the next token from logits, batched with per-row settings.

Every row of a batch may have its own temperature, top-k, top-p and repetition penalty (the server batches requests
with different settings), so each setting is a `[B]` tensor and nothing loops over rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens.

    temperature: 0 -> greedy (argmax); else softmax(logits / temperature).
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all), "nucleus
        sampling" (Holtzman et al., arXiv:1904.09751).
    repetition_penalty: divide positive / multiply negative logits of tokens already in the prompt or output by it
        (CTRL, arXiv:1909.05858); 1.0 = off.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def _column(values: list[float], logits_BV: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=logits_BV.device)[:, None]


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty_B1: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty on the tokens marked in `seen_BV` (bool): positive logits / penalty, negative * penalty."""
    penalised_BV = torch.where(logits_BV > 0, logits_BV / penalty_B1, logits_BV * penalty_B1)
    return torch.where(seen_BV, penalised_BV, logits_BV)


def filter_top_k_top_p(logits_BV: torch.Tensor, top_k_B1: torch.Tensor, top_p_B1: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top-k and outside its top-p nucleus (the most likely token always
    stays). `top_k` 0 keeps all; `top_p` 1 keeps all."""
    V = logits_BV.shape[-1]
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=logits_BV.device)
    k_B1 = torch.where(top_k_B1 > 0, top_k_B1, V)
    drop_BV = rank_V >= k_B1  # beyond the top k
    probs_BV = sorted_BV.softmax(-1)
    before_BV = probs_BV.cumsum(-1) - probs_BV  # probability of the strictly more likely tokens
    drop_BV |= before_BV >= top_p_B1  # the nucleus already reached top_p without this token
    drop_BV[:, 0] = False
    return logits_BV.masked_fill(drop_BV.scatter(1, order_BV, drop_BV), float("-inf"))


def sample_next(
    logits_BV: torch.Tensor,
    params: list[SamplingParams],
    seen_BV: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of every row `[B]` (int64) from `logits_BV` and one `SamplingParams` per row; `seen_BV` marks
    the tokens each row has already seen (for the repetition penalty)."""
    logits_BV = logits_BV.float()
    if seen_BV is not None and any(p.repetition_penalty != 1.0 for p in params):
        logits_BV = apply_repetition_penalty(
            logits_BV, seen_BV, _column([p.repetition_penalty for p in params], logits_BV)
        )
    greedy_B = logits_BV.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy_B
    temperature_B1 = _column([p.temperature or 1.0 for p in params], logits_BV)
    top_k_B1 = _column([p.top_k for p in params], logits_BV, torch.long)
    top_p_B1 = _column([p.top_p for p in params], logits_BV)
    filtered_BV = filter_top_k_top_p(logits_BV / temperature_B1, top_k_B1, top_p_B1)
    sampled_B = torch.multinomial(filtered_BV.softmax(-1), 1, generator=generator)[:, 0]
    is_greedy_B = torch.tensor([p.temperature == 0 for p in params], device=logits_BV.device)
    return torch.where(is_greedy_B, greedy_B, sampled_B)
