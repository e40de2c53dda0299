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
    dispatcher exchanges rows with all_to_all over the ep group. Under expert tensor parallelism (tp > 1 with
    `expert_tp`) they are split over the ("ep", "tp") ranks: E/ep experts, each of width F/tp (`tp.EXPERT_TP`);
    each tp rank exchanges rows with the ep ranks of its own tp index, which hold the same slice of the width."""
    ep_mesh = mesh["ep"]
    split_mesh, split = ep_mesh, {"w13": [Shard(0)], "w2": [Shard(0)]}
    if mesh.cfg.tp > 1 and mesh.cfg.expert_tp:
        from .tp import EXPERT_TP

        split_mesh, split = mesh.experts["ep", "tp"], {n: [Shard(0), p] for n, p in EXPERT_TP.items()}
    for moe in moe_layers(model):
        for name, placements in split.items():
            weight = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(distribute_tensor(weight.detach(), split_mesh, placements)))
        cfg = moe.cfg
        moe.dispatcher = AllToAllDispatcher(cfg.num_experts, ep_mesh.get_group(), cfg.capacity_factor, cfg.drop_policy)


def apply_global_stats(model: nn.Module, mesh: ParallelMesh | None, seq_len: int | None = None) -> None:
    """Balance losses count the expert assignments of every rank holding different tokens ("dp_cp"), so the mean
    of the ranks' losses is the single-process loss of the global batch. The sequence-wise balance loss counts per
    training sequence of `seq_len` tokens (the rows of the packed batches; None: each input row), summed over the
    "cp" ranks, which hold slices of the same sequences; it is a mean over sequences, so the mean over the ranks
    reading different rows is again the single-process loss."""
    stats = mesh["dp_cp"] if mesh is not None else None
    cp = mesh["cp"] if mesh is not None else None
    for moe in moe_layers(model):
        moe.seq_len = seq_len
        moe.stats_group = stats.get_group() if stats is not None and stats.size() > 1 else None
        moe.seq_group = cp.get_group() if cp is not None and cp.size() > 1 else None
