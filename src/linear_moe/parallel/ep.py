"""Expert parallelism, and the global statistics every MoE layer needs once tokens are spread over ranks."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor

from ..moe import AllToAllDispatcher
from .checkpointing import moe_layers
from .mesh import ParallelMesh


def apply_ep(model: nn.Module, mesh: ParallelMesh) -> None:
    """Split every MoE layer's routed experts over the "ep" ranks, in place: `w13` / `w2` become DTensors
    sharded on the expert dim (each rank keeps E/ep experts, from the same full initialisation), and the layer's
    dispatcher exchanges rows with all_to_all over the ep group."""
    ep_mesh = mesh["ep"]
    for moe in moe_layers(model):
        for name in ("w13", "w2"):
            weight = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(weight.detach(), ep_mesh, [Shard(0)])))
        cfg = moe.cfg
        moe.dispatcher = AllToAllDispatcher(cfg.num_experts, ep_mesh.get_group(), cfg.capacity_factor, cfg.drop_policy)


def apply_global_stats(model: nn.Module, mesh: ParallelMesh) -> None:
    """Balance losses count the expert assignments of every rank holding different tokens ("dp_cp"), so the mean
    of the ranks' losses is the single-process loss of the global batch."""
    dp_cp = mesh["dp_cp"]
    if dp_cp.size() == 1:
        return
    for moe in moe_layers(model):
        moe.stats_group = dp_cp.get_group()
