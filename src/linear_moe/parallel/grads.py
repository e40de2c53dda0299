"""Gradient-norm clipping over parameters that live on different meshes (FSDP-sharded dense weights, experts
split over ep and sharded over efsdp, plain tensors in one process)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (L2) whose total norm covers every rank's shard: the norms of the
    gradients on each (mesh, placements) are taken together and made whole (`full_tensor`), then combined, and
    summed (in squares) over `group` (pipeline stages, which hold different parameters). Returns the total norm
    before clipping."""
    groups: dict[object, list[nn.Parameter]] = {}  # foreach kernels take one mesh at a time
    for p in parameters:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    norms = []
    for params in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:  # (every pipeline stage holds parameters)
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms)) if len(norms) > 1 else norms[0]
    if group is not None:
        square = total.square()
        dist.all_reduce(square, group=group)
        total = square.sqrt()
    for params in groups.values():
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
