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

from linear_moe.ops.checks import check_layout, check_varlen  # noqa: F401 - re-exported until mixers import checks


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


def like(ref: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast tensors to `ref`'s dtype: fla's kernels need q/k/v (and beta) in one dtype, which autocast
    breaks (an l2 norm under autocast returns float32 next to bf16 projections)."""
    return tuple(None if t is None else t.to(ref.dtype) for t in tensors)
