"""FSDP2 (`fully_shard`) per block and at the root; HSDP when parameters are also replicated.

Gradients are summed, never averaged, by the collectives: the trainer scales each rank's loss by its share of the
global batch (its tokens over the global token count), so the sum over ranks is the gradient of the global batch's
loss, for the dense parameters (reduced over every data rank) and for the experts (reduced over the `efsdp` ranks
only, having already received the gradients of every rank's tokens through the all-to-all) alike. Gloo has no
PREMUL_SUM, so the sum is forced (`set_force_sum_reduction_for_comms`) and the divide factor is 1 on every backend.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from torch.distributed.tensor.placement_types import _StridedShard

from .checkpointing import moe_layers, transformer_blocks


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """bf16 parameters in forward/backward with float32 gradient reduction (GPU); plain float32 when None (CPU)."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _sum_gradients(module: FSDPModule) -> None:
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def apply_fsdp(
    model: nn.Module, dense_mesh: DeviceMesh, expert_mesh: DeviceMesh | None, param_dtype: torch.dtype | None
) -> None:
    """Shard `model` in place: the routed experts of each MoE layer over `expert_mesh` (when the experts are split
    over ep, their DTensors keep dim 0 for ep and FSDP takes the next dim that tp does not split), each block over
    `dense_mesh`, then the root (embedding, final norm, head). A 2-D mesh (dp_replicate, shard) gives HSDP."""
    mp = mixed_precision(param_dtype)
    sharded: list[FSDPModule] = []
    if expert_mesh is not None:
        for moe in moe_layers(model):
            sharded.append(fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp, shard_placement_fn=_free_dim))
    blocks = transformer_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once in backward: keep them gathered
        sharded.append(fully_shard(block, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1))
    for root in getattr(model, "pipeline_stages", None) or [model]:  # a pipeline rank: each stage is a root
        sharded.append(fully_shard(root, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False))
    for module in sharded:
        _sum_gradients(module)


def _free_dim(param: nn.Parameter) -> Shard:
    """Expert weights [E_local, ., .]: shard the first dim that no other placement splits (dim 0 holds the ep
    split; under expert tensor parallelism w13's dim 2 and w2's dim 1 hold the tp split): plain shards."""
    split = {p.dim for p in getattr(param, "placements", ()) if isinstance(p, Shard | _StridedShard)}
    return Shard(next(d for d in range(1, param.ndim) if d not in split))
