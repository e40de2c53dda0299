"""Checkpoints of strided shards: DCP describes each rank's part of a tensor as one box (offsets, sizes), so a shard
made of several blocks of the global tensor cannot be written as it is. Under expert tensor parallelism w13's
`_StridedShard(2, split_factor=2)` gives a rank two blocks of columns (its slice of gate and of up, parallel/tp.py
`EXPERT_TP`); around DCP's save and load such tensors are redistributed to plain `Shard` on the same dim (contiguous
column blocks, the same global tensor), and loaded values back to the parameters' own placements.

    state = for_dcp(like)              # what dcp.save writes, or what dcp.load fills
    dcp.load(state, ...)
    like = from_dcp(state, like)       # the loaded values in the placements of `like`

A checkpoint so written holds the same tensors under the same names as one written in one process: it loads under
any layout. The redistribution costs one all-to-all of those tensors (and their optimizer moments) over tp, and a
second copy of them while the checkpoint is written or read. FSDP2's own `_StridedShard` over a tp-split dim 0 (a
contiguous block per rank) is left as it is: DCP writes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Placement, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def writable_placements(t: DTensor) -> tuple[Placement, ...] | None:
    """`t`'s placements with every strided shard that leaves a rank several blocks replaced by `Shard` on its dim;
    None when DCP can write `t` as it is. A `_StridedShard(d, split_factor=s)` is one block per rank when the mesh
    dims after it split dim d into exactly s parts (FSDP2 over tp); otherwise its s blocks are apart."""
    placements, mesh = list(t.placements), t.device_mesh
    changed = False
    for i, p in enumerate(placements):
        if not isinstance(p, _StridedShard):
            continue
        after = [j for j in range(i + 1, len(placements)) if isinstance(placements[j], Shard | _StridedShard)]
        if p.split_factor != math.prod(mesh.size(j) for j in after if placements[j].dim == p.dim):
            placements[i], changed = Shard(p.dim), True
    return tuple(placements) if changed else None


def _map(fn: Callable[..., Any], obj: Any, *others: Any) -> Any:
    """`fn` applied to the leaves of nested dicts and lists (`others`: the same structure, their leaves passed too;
    None where theirs lacks the key or index: dcp.load replaces non-tensor entries such as an optimizer's
    `param_groups` by the checkpoint's, which another layout may have written longer or shorter)."""

    def part(o: Any, key: Any) -> Any:
        if isinstance(o, dict):
            return o.get(key)
        return o[key] if isinstance(o, list) and key < len(o) else None

    if isinstance(obj, dict):
        return {k: _map(fn, v, *(part(o, k) for o in others)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(fn, v, *(part(o, i) for o in others)) for i, v in enumerate(obj)]
    return fn(obj, *others)


@torch.no_grad()
def for_dcp(state: Any) -> Any:
    """`state` (nested dicts and lists of tensors and values) with every DTensor that DCP cannot write (see
    `writable_placements`) replaced by a copy in plain shards; the other leaves are the same objects."""

    def leaf(t):
        placements = writable_placements(t) if isinstance(t, DTensor) else None
        return t if placements is None else t.redistribute(placements=placements)

    return _map(leaf, state)


@torch.no_grad()
def from_dcp(loaded: Any, like: Any) -> Any:
    """`loaded` (filled by dcp.load into what `for_dcp(like)` gave) with every leaf in the placements of the same
    leaf of `like`."""

    def leaf(t, ref):
        if isinstance(t, DTensor) and isinstance(ref, DTensor) and t.placements != ref.placements:
            return t.redistribute(placements=ref.placements)
        return t

    return _map(leaf, loaded, like)
