"""Log-likelihoods of token sequences: packed continuations, whole documents with carried states, perplexity.

Continuations of many requests go through one forward, packed end to end with `cu_seqlens` (no padding; every
request starts from a fresh state), and only the positions that predict continuation tokens reach the LM head.
A document longer than one forward is scored in chunks that carry the recurrent states (and the KV cache of
softmax layers), so every token is conditioned on the whole document before it, not on a sliding window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..generate.states import init_states


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_len: int,
    max_tokens: int = 8192,
) -> list[tuple[float, bool]]:
    """For each (context, continuation) of token ids: (sum of log p(continuation | context), whether greedy decoding
    gives the continuation). Inputs longer than `max_len` keep their last `max_len` tokens; up to `max_tokens`
    tokens of several requests share one packed forward."""
    results: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
    batch: list[int] = []
    used = 0
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError("score_continuations: an empty continuation has nothing to score")
        n = min(len(ctx) + len(cont) - 1, max_len)
        if batch and used + n > max_tokens:
            _score_packed(model, pairs, batch, max_len, results)
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        _score_packed(model, pairs, batch, max_len, results)
    return results


def _score_packed(model, pairs, batch: list[int], max_len: int, results: list) -> None:
    """One packed forward over the requests `batch`; fills their entries of `results`."""
    device = _device(model)
    ids, lens, counts, positions, targets = [], [], [], [], []
    for i in batch:
        ctx, cont = pairs[i]
        full = (list(ctx) + list(cont))[-(max_len + 1) :]
        inputs, n_cont = full[:-1], min(len(cont), len(full) - 1)
        positions += range(len(ids) + len(inputs) - n_cont, len(ids) + len(inputs))
        targets += full[-n_cont:]
        ids += inputs
        lens.append(len(inputs))
        counts.append(n_cont)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=device) if len(lens) > 1 else None
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    logits_PV = model(input_ids, cu_seqlens=cu, logits_to_keep=torch.tensor(positions, device=device)).logits[0]
    logprobs_PV = logits_PV.float().log_softmax(-1)
    targets_P = torch.tensor(targets, device=device)
    token_lp_P = logprobs_PV.gather(1, targets_P[:, None])[:, 0]
    greedy_P = logprobs_PV.argmax(-1) == targets_P
    for i, lp, greedy in zip(batch, token_lp_P.split(counts), greedy_P.split(counts), strict=True):
        results[i] = (float(lp.sum()), bool(greedy.all()))


@torch.no_grad()
def sequence_logprob(model: nn.Module, ids: Sequence[int], chunk: int = 2048) -> tuple[float, int]:
    """(sum over t >= 1 of log p(ids[t] | ids[:t]), number of scored tokens), `chunk` tokens per forward with the
    states carried from chunk to chunk."""
    device = _device(model)
    dtype = next(model.parameters()).dtype
    states = init_states(model, 1, device, dtype, max_seq_len=max(len(ids), 1))
    total, scored = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        piece = torch.tensor([list(ids[start : start + chunk + 1])], dtype=torch.long, device=device)
        inputs, targets = piece[:, :-1], piece[0, 1:]
        out = model(inputs, states=states, use_cache=True)
        states = out.states
        logprobs = out.logits[0].float().log_softmax(-1)
        total += float(logprobs.gather(1, targets[:, None]).sum())
        scored += len(targets)
    return total, scored


@dataclass
class Perplexity:
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the text
    nll: float  # total negative log-likelihood (nats)

    @property
    def token_perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll_per_token": self.nll / max(self.tokens, 1),
            "perplexity": self.token_perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def perplexity(model: nn.Module, tokenizer, text: str, chunk: int = 2048) -> Perplexity:
    """Perplexity of `text` as one document (after an end-of-text token), every token conditioned on all before."""
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError("perplexity: the text is empty")
    logprob, n = sequence_logprob(model, ids, chunk)
    return Perplexity(n, len(text.encode("utf-8")), -logprob)
