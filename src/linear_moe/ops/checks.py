"""Input checks shared by the ops and the mixers: layout `[B, T, H, D]`, packed offsets, exact shapes.

Every check raises a one-line `ValueError` that names the op, the argument, the expected and the actual shape.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_layout(name: str, **tensors: Tensor | None) -> None:
    """Raise a clear error unless every given tensor is 4-D `[B, T, H, D]` with matching B, T, H."""
    ref = None
    for arg, t in tensors.items():
        if t is None:
            continue
        if t.dim() != 4:
            raise ValueError(f"{name}: `{arg}` must be [B, T, H, D] (4-D), got shape {tuple(t.shape)}")
        if ref is None:
            ref = (arg, t.shape[:3])
        elif t.shape[:3] != ref[1]:
            raise ValueError(
                f"{name}: `{arg}` has [B, T, H] = {tuple(t.shape[:3])} but `{ref[0]}` has {tuple(ref[1])}; "
                "all inputs use the [B, T, H, D] layout"
            )


def check_varlen(name: str, x: Tensor, cu_seqlens: Tensor | None) -> None:
    """With `cu_seqlens` the batch must be 1 and the offsets must span the sequence."""
    if cu_seqlens is None:
        return
    if x.shape[0] != 1:
        raise ValueError(f"{name}: with cu_seqlens the batch size must be 1 (packed), got {x.shape[0]}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"{name}: cu_seqlens must be 1-D offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_cuda:  # reading values would sync the host on every layer; the model checks them once
        return
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != x.shape[1]:
        raise ValueError(f"{name}: cu_seqlens must be 1-D offsets from 0 to T={x.shape[1]}, got {cu_seqlens.tolist()}")


def expect_shape(name: str, arg: str, t: Tensor | None, shape: tuple[int, ...], what: str) -> None:
    """Raise a one-line ValueError unless `t` (when given) has exactly `shape`."""
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: `{arg}` must have shape {what} = {tuple(shape)}, got {tuple(t.shape)}")


def check_qkv(name: str, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor | None, **gates: Tensor | None) -> int:
    """Validate `[B, T, H, D]` q/k/v (+ 4-D gates of q's shape) and packing; return N (batch or documents)."""
    check_layout(name, q=q, k=k, v=v)
    expect_shape(name, "k", k, tuple(q.shape), "q.shape [B, T, H, K]")
    for arg, g in gates.items():
        expect_shape(name, arg, g, tuple(q.shape), "q.shape [B, T, H, K]")
    check_varlen(name, q, cu_seqlens)
    return q.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1


def check_state(name: str, state: Tensor | None, n: int, h: int, k: int, v: int, v_first: bool = False) -> None:
    """`initial_state` (when given) is `[N, H, K, V]`, or `[N, H, V, K]` with `v_first`."""
    if v_first:
        expect_shape(name, "initial_state", state, (n, h, v, k), "[N, H, V, K]")
    else:
        expect_shape(name, "initial_state", state, (n, h, k, v), "[N, H, K, V]")


def check_per_head(name: str, q: Tensor, x: Tensor | None, arg: str) -> None:
    """A per-head tensor (beta, a scalar gate) is `[B, T, H]`, q's first three dims."""
    expect_shape(name, arg, x, tuple(q.shape[:3]), "q.shape[:3] [B, T, H]")
