"""One DeviceMesh for the whole run, built from a resolved `ParallelConfig`, with the views each part needs.

    dense    ("pp", "dp_replicate", "dp_shard", "cp", "tp")   the layout itself: TP over "tp", CP over "cp"
    fsdp     ("pp", "dp_replicate", "dp_shard_cp", "tp")      dense parameters: FSDP over dp_shard * cp (HSDP)
    experts  ("pp", "dp_replicate", "efsdp", "ep", "tp")      routed experts: split over ep (width: tp), FSDP over efsdp
    flattened: "dp" (dp_replicate * dp_shard: the ranks reading different rows), "dp_cp" (every rank holding
    different tokens: losses, token counts and expert loads are summed over it)

All views unflatten the same 1-D world mesh, so `efsdp * ep == dp_shard_cp == dp_shard * cp` cover the same ranks
in the same order, and FSDP accepts the experts' DTensors (split over "ep") under its "efsdp" mesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig

DENSE = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FSDP = ("pp", "dp_replicate", "dp_shard_cp", "tp")
EXPERTS = ("pp", "dp_replicate", "efsdp", "ep", "tp")


@dataclass
class ParallelMesh:
    """The run's DeviceMesh views (see the module docstring); `cfg` is the resolved layout."""

    cfg: ParallelConfig
    world: DeviceMesh
    dense: DeviceMesh
    fsdp: DeviceMesh
    experts: DeviceMesh
    flat: dict[str, DeviceMesh]  # "dp", "dp_cp"

    def __getitem__(self, name: str) -> DeviceMesh:
        """A 1-D view by name: any dimension of the three layouts, or "dp" / "dp_cp"."""
        for layout in (self.flat, self.dense, self.fsdp, self.experts):
            if name in (layout if isinstance(layout, dict) else layout.mesh_dim_names):
                return layout[name]
        raise KeyError(f"no mesh dimension {name!r}")

    @property
    def dp_rank(self) -> int:
        """This rank's place among the `cfg.dp` ranks that read different rows."""
        return self["dp"].get_local_rank()


def build_mesh(cfg: ParallelConfig, device_type: str) -> ParallelMesh:
    """The mesh of a resolved `cfg` over the initialised default process group (whose size is the world)."""
    world_size = dist.get_world_size()
    if cfg.world_size != world_size:
        raise ValueError(f"build_mesh: the layout covers {cfg.world_size} ranks, the process group {world_size}")
    world = init_device_mesh(device_type, (world_size,), mesh_dim_names=("world",))
    dense = world._unflatten(0, tuple(getattr(cfg, d) for d in DENSE), DENSE)
    fsdp = world._unflatten(0, (cfg.pp, cfg.dp_replicate, cfg.dp_shard * cfg.cp, cfg.tp), FSDP)
    experts = world._unflatten(0, (cfg.pp, cfg.dp_replicate, cfg.expert_shard, cfg.ep, cfg.tp), EXPERTS)
    flat = {
        "dp": dense["dp_replicate", "dp_shard"]._flatten("dp"),
        "dp_cp": dense["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
    }
    return ParallelMesh(cfg, world, dense, fsdp, experts, flat)
