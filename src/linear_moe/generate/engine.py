"""Generation: chunked prefill, then one token at a time from the carried states.

Prefill packs the prompts of a batch end to end (`cu_seqlens`), so prompts of different lengths need no padding and
every row starts from its own zero state (left padding would run pad tokens through the recurrent states). Long
prompts go `prefill_chunk` tokens per row at a time, carrying the states; only the last position of each prompt goes
through the LM head. Decoding feeds `[B, 1]` tokens with the states: in eval mode the linear mixers then run their
`fused_recurrent` kernels, and the state size does not depend on the length (only softmax attention layers keep a
KV cache, preallocated to `max_seq_len` slots).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from .sampling import SamplingParams, sample_next
from .states import States, has_kv_cache, init_states, put_rows, select_rows, state_bytes

DecodeStep = Callable[[torch.Tensor, States], tuple[torch.Tensor, States]]


class GenerationError(ValueError):
    """A prompt or setting generation cannot serve (one-line message)."""


@dataclass
class GenerationConfig:
    """What `generate` does after the prompt."""

    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer); the text ends before the first one
    stop_at_eos: bool = True
    seed: int = 0
    prefill_chunk: int = 2048  # prompt tokens per row per prefill forward
    max_seq_len: int | None = None  # KV-cache slots of softmax layers (None: longest prompt + max_new_tokens)


@dataclass
class Generation:
    """One continuation: `ids` (new tokens, EOS excluded), `text` (None without a tokenizer; cut before a stop
    string), and why it ended: "eos", "stop" or "length"."""

    ids: list[int]
    text: str | None
    finish_reason: str


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    batch_size: int = 0
    state_bytes: int = 0  # all sequences' states (recurrent + conv + KV caches)
    peak_bytes: int = 0  # peak device memory (CUDA) or peak resident memory of the process (CPU)

    def line(self) -> str:
        """`N tokens in S s (X tokens/s decode), prefill P tokens in S s; state M MiB (m MiB per sequence), peak ...`"""
        mib = 2**20
        rate = self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")
        per_seq = self.state_bytes / max(self.batch_size, 1)
        return (
            f"{self.new_tokens} tokens in {self.decode_s:.2f}s ({rate:.1f} tokens/s decode, batch {self.batch_size}); "
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f}s; state {self.state_bytes / mib:.2f} MiB "
            f"({per_seq / mib:.2f} MiB per sequence); peak memory {self.peak_bytes / mib:.0f} MiB"
        )


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def prefill(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_seq_len: int,
    chunk: int = 2048,
) -> tuple[torch.Tensor, States]:
    """Run every prompt (each at least one token) from a zero state, `chunk` tokens per row at a time, packed with
    `cu_seqlens`. Returns the logits after each prompt's last token `[N, V]` and the states of the N rows."""
    device, dtype = _device_dtype(model)
    N = len(prompts)
    states = init_states(model, N, device, dtype, max_seq_len)
    logits_NV: list[torch.Tensor | None] = [None] * N
    for start in range(0, max(len(p) for p in prompts), chunk):
        rows = [n for n in range(N) if len(prompts[n]) > start]
        pieces = [list(prompts[n][start : start + chunk]) for n in rows]
        lens = torch.tensor([len(p) for p in pieces], device=device)
        cu_seqlens = torch.cat([lens.new_zeros(1), lens.cumsum(0)]) if len(rows) > 1 else None
        ids = torch.tensor([[t for p in pieces for t in p]], dtype=torch.long, device=device)
        rows_t = torch.tensor(rows, device=device)
        part = states if len(rows) == N else select_rows(states, rows_t)
        out = model(ids, cu_seqlens=cu_seqlens, states=part, use_cache=True, logits_to_keep=lens.cumsum(0) - 1)
        logits_RV, part = out.logits[0], out.states  # each piece's last position: no [T, V] logits
        states = part if len(rows) == N else put_rows(states, rows_t, part)
        for j, n in enumerate(rows):
            if len(prompts[n]) <= start + chunk:
                logits_NV[n] = logits_RV[j]
    return torch.stack(logits_NV), states


def decode_step(model: nn.Module, tokens_B: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
    """One token per row: `tokens_B [B]` -> next-token logits `[B, V]` and the new states."""
    out = model(tokens_B[:, None], states=states, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.states


class TextStream:
    """Detokenizes one sequence incrementally: `push(id)` returns the text that is now final. Text is held back
    while it ends in an incomplete UTF-8 character or could be the start of a stop string; `stopped` turns True
    when a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.emitted, self.stopped = "", "", False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._emit(self.text)
        self.text = text
        safe = text.rstrip("\ufffd")
        hold = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        return self._emit(safe[: len(safe) - hold])

    def flush(self) -> str:
        """The rest of the text (at the end of the sequence)."""
        return self._emit(self.text)

    def _emit(self, safe: str) -> str:
        if not safe.startswith(self.emitted):
            return ""
        new, self.emitted = safe[len(self.emitted) :], safe
        return new


def check_fits(model: nn.Module, prompt_lens: Sequence[int], max_new_tokens: int, max_seq_len: int) -> None:
    """One-line error when a prompt (plus the new tokens) does not fit the softmax layers' KV cache."""
    if min(prompt_lens) < 1:
        raise GenerationError("empty prompt: give at least one token (the CLI starts empty prompts with EOS)")
    longest = max(prompt_lens)
    if has_kv_cache(model) and longest + max_new_tokens > max_seq_len:
        raise GenerationError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit the {max_seq_len}-token KV "
            "cache of the softmax attention layers; raise max_seq_len or shorten the prompt"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    tokenizer=None,
    eos_id: int | None = None,
    on_text: Callable[[int, str], None] | None = None,
    step: DecodeStep | None = None,
) -> tuple[list[Generation], GenerationStats]:
    """Continue every prompt (token ids; lengths may differ) as one batch.

    `tokenizer` (a `linear_moe.data.Tokenizer`) enables text, stop strings and `on_text(row, new_text)` streaming;
    `eos_id` defaults to the tokenizer's. `step` replaces `decode_step` (e.g. a CUDA-graph `StaticDecodeStep`).
    Returns one `Generation` per prompt and the run's `GenerationStats`."""
    config = config or GenerationConfig()
    if config.stop and tokenizer is None:
        raise GenerationError("stop strings need a tokenizer")
    eos_id = tokenizer.eos_id if eos_id is None and tokenizer is not None else eos_id
    device, _ = _device_dtype(model)
    N, lens = len(prompts), [len(p) for p in prompts]
    max_seq_len = config.max_seq_len or max(lens) + config.max_new_tokens
    check_fits(model, lens, config.max_new_tokens, max_seq_len)
    was_training = model.training
    model.eval()
    try:
        stats = GenerationStats(prompt_tokens=sum(lens), batch_size=N)
        t0 = time.perf_counter()
        logits_NV, states = prefill(model, prompts, max_seq_len, config.prefill_chunk)
        _sync(device)
        stats.prefill_s = time.perf_counter() - t0
        gens = _decode(
            model,
            prompts,
            logits_NV,
            states,
            config,
            tokenizer,
            eos_id,
            on_text,
            step or partial(decode_step, model),
            stats,
        )
        stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
        stats.peak_bytes = peak_memory_bytes(device)
    finally:
        model.train(was_training)
    return gens, stats


def _decode(model, prompts, logits_NV, states, config, tokenizer, eos_id, on_text, step, stats) -> list[Generation]:
    N = len(prompts)
    params = [config.sampling] * N
    generator = torch.Generator(device=logits_NV.device).manual_seed(config.seed)
    seen_NV = None
    if config.sampling.repetition_penalty != 1.0:
        seen_NV = torch.zeros_like(logits_NV, dtype=torch.bool)
        for n, p in enumerate(prompts):
            seen_NV[n, torch.tensor(list(p), device=seen_NV.device)] = True
    streams = [TextStream(tokenizer, config.stop) if tokenizer is not None else None for _ in range(N)]
    ids: list[list[int]] = [[] for _ in range(N)]
    reason: list[str | None] = [None] * N
    # a model vocabulary padded beyond the tokenizer's (Qwen's 151,936 rows for 151,643 tokens): never sample the
    # rows no token stands for
    known = tokenizer.vocab_size if tokenizer is not None else logits_NV.shape[-1]
    for i in range(config.max_new_tokens):
        if known < logits_NV.shape[-1]:
            logits_NV = logits_NV.clone()
            logits_NV[:, known:] = float("-inf")
        tokens_N = sample_next(logits_NV, params, seen_NV, generator)
        if seen_NV is not None:
            seen_NV[torch.arange(N), tokens_N] = True
        for n, tok in enumerate(tokens_N.tolist()):
            if reason[n] is None:
                reason[n] = _append(n, tok, ids[n], streams[n], eos_id, config.stop_at_eos, on_text)
                stats.new_tokens += 1
        if all(r is not None for r in reason) or i == config.max_new_tokens - 1:
            break
        logits_NV, states = step(tokens_N, states)
    stats.state_bytes = state_bytes(states)
    out = []
    for n in range(N):
        if streams[n] is not None and (rest := streams[n].flush()) and on_text is not None:
            on_text(n, rest)
        out.append(Generation(ids[n], streams[n].text if streams[n] else None, reason[n] or "length"))
    return out


def _append(n: int, tok: int, ids: list[int], stream, eos_id, stop_at_eos: bool, on_text) -> str | None:
    """Record one new token of row n; the finish reason when the row ends with it."""
    if stop_at_eos and tok == eos_id:
        return "eos"
    ids.append(tok)
    if stream is None:
        return None
    new = stream.push(tok)
    if new and on_text is not None:
        on_text(n, new)
    return "stop" if stream.stopped else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
