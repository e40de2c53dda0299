"""A short sample from a trained model, to eyeball a run (not the inference engine).

With a model that returns recurrent `states` (`use_cache=True`) the prompt is prefilled once and
each new token is one step with the carried states; otherwise the whole sequence is re-run.
"""

from __future__ import annotations

import torch
from torch import nn


def _next_token(logits_V: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Sample one id from `logits [V]` (greedy when temperature == 0) -> `[1, 1]`."""
    if temperature <= 0:
        return logits_V.argmax().view(1, 1)
    logits_V = logits_V.float() / temperature
    if 0 < top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    return torch.multinomial(probs_V.cpu(), 1, generator=generator).view(1, 1).to(logits_V.device)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend `input_ids [1, T]` by up to `max_new_tokens` sampled ids -> `[1, T + n]`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = input_ids
    out = model(ids, use_cache=True)
    states = getattr(out, "states", None)
    for _ in range(max_new_tokens):
        nxt = _next_token(out.logits[0, -1], temperature, top_k, generator)
        ids = torch.cat([ids, nxt], dim=1)
        if eos_id is not None and int(nxt) == eos_id:
            break
        out = model(nxt, states=states, use_cache=True) if states is not None else model(ids)
        states = getattr(out, "states", None) if states is not None else None
    model.train(was_training)
    return ids
