"""Device dispatch between fla's Triton kernels (CUDA) and our PyTorch implementations.

fla is optional and imported lazily: importing `linear_moe` never imports triton or fla.
Set `LINEAR_MOE_KERNELS=torch` to force the PyTorch path everywhere (useful to compare).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any

import torch


@functools.cache
def fla_available() -> bool:
    """True when fla (flash-linear-attention) and triton import cleanly."""
    try:
        importlib.import_module("fla.ops")
    except Exception:  # noqa: BLE001 - any import failure means "use the torch path"
        return False
    return True


def use_fla(x: torch.Tensor) -> bool:
    """Whether an op on `x` should run fla's kernel: CUDA tensor, fla installed, not disabled."""
    if os.environ.get("LINEAR_MOE_KERNELS", "auto") == "torch":
        return False
    return x.is_cuda and fla_available()


def fla_op(module: str, name: str) -> Callable[..., Any]:
    """Return `fla.ops.<module>.<name>` (imported on first use)."""
    return getattr(importlib.import_module(f"fla.ops.{module}"), name)


def fla_module_fn(module: str, name: str) -> Callable[..., Any]:
    """Return `fla.modules.<module>.<name>` (fused norms, convolutions; imported on first use)."""
    return getattr(importlib.import_module(f"fla.modules.{module}"), name)


def check_layout(name: str, **tensors: torch.Tensor | None) -> None:
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


def check_varlen(name: str, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> None:
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


def like(ref: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast tensors to `ref`'s dtype: fla's kernels need q/k/v (and beta) in one dtype, which autocast
    breaks (an l2 norm under autocast returns float32 next to bf16 projections)."""
    return tuple(None if t is None else t.to(ref.dtype) for t in tensors)
