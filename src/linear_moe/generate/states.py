"""Per-layer decoding states as a batch: allocate, pick rows, put rows back, join batches, measure.

`states` is what the model takes and returns: one `dict[str, Tensor]` per layer (None: that layer starts fresh),
every tensor with the row (sequence) dimension first. Rows are independent, so a batch of sequences can be split,
joined and reordered freely between decode steps.
"""

from __future__ import annotations

import torch
from torch import nn

States = list[dict[str, torch.Tensor] | None]


def mixers(model: nn.Module) -> list[nn.Module]:
    """The token mixer of every layer, in order."""
    return [block.mixer for block in model.layers]


def has_kv_cache(model: nn.Module) -> bool:
    """Whether any layer keeps a KV cache (softmax attention), whose size is fixed by `max_seq_len`."""
    return any(getattr(m, "kv_cache", False) for m in mixers(model))


def init_states(
    model: nn.Module, batch_size: int, device: torch.device, dtype: torch.dtype, max_seq_len: int
) -> States:
    """Zero states of `batch_size` rows for every layer (`model.init_states`; KV caches of `max_seq_len` slots)."""
    return model.init_states(batch_size, device, dtype, max_seq_len=max_seq_len)


def select_rows(states: States, rows: torch.Tensor) -> States:
    """The rows `rows` ([N] int64) of every state tensor."""
    return [None if s is None else {k: t.index_select(0, rows) for k, t in s.items()} for s in states]


def put_rows(states: States, rows: torch.Tensor, part: States) -> States:
    """`states` with rows `rows` replaced by `part`, in place."""
    for s, p in zip(states, part, strict=True):
        for k, t in (s or {}).items():
            t.index_copy_(0, rows, p[k].to(t.dtype))
    return states


def join_rows(a: States, b: States) -> States:
    """The batch of `a`'s rows followed by `b`'s."""
    return [None if x is None else {k: torch.cat([x[k], y[k]]) for k in x} for x, y in zip(a, b, strict=True)]


def state_bytes(states: States | None) -> int:
    """Bytes held by all state tensors."""
    return sum(t.numel() * t.element_size() for s in states or [] if s is not None for t in s.values())


def state_shapes(states: States) -> list[dict[str, tuple[int, ...]] | None]:
    """The shape of every state tensor (what stays constant while a linear model decodes)."""
    return [None if s is None else {k: tuple(t.shape) for k, t in s.items()} for s in states]
