"""`ParallelConfig`: how a run's processes split the work, and the one place its layout is checked.

Batches do not depend on the layout: `data.micro_batch_size` counts the rows of a micro-batch over all
data-parallel ranks, and each of the `dp = dp_replicate * dp_shard` ranks reads its `micro_batch_size / dp` of them.

The dimensions multiply to the world size: `dp_replicate * dp_shard * cp * tp * pp == world_size` (`dp_shard=-1`
takes the ranks left over). Expert parallelism borrows ranks instead of adding them: the experts of a layer are
split over `ep` ranks taken from the `dp_shard * cp` ranks, which hold different tokens and so have tokens to
exchange; the experts are sharded (FSDP) over the `dp_shard * cp / ep` ranks left, and replicated over
`dp_replicate`. See docs/parallel.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

from ..config import ConfigError

PPSchedule = Literal["1F1B", "Interleaved1F1B", "GPipe"]  # the schedules parallel/pp.py builds
CPBackend = Literal["auto", "fla", "own"]  # how cp carries the linear mixers' states (parallel/cp.py)
CP_BACKENDS = get_args(CPBackend)
DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")  # the dimensions whose product is the world size


@dataclass
class ParallelConfig:
    """The `parallel` section of a run config (every dimension 1: one process, as without torchrun)."""

    dp_replicate: int = 1  # data-parallel replicas (HSDP: parameters replicated across, sharded within)
    dp_shard: int = -1  # data-parallel ranks that shard parameters, gradients and optimizer state (FSDP2); -1 = rest
    tp: int = 1  # tensor parallel: heads / FFN columns split over ranks (sequence-parallel norms)
    expert_tp: bool = True  # under tp, split every expert's FFN width too (false: MoE layers replicated over tp)
    ep: int = 1  # expert parallel: each MoE layer's experts split over ranks taken from dp_shard * cp
    cp: int = 1  # context parallel: the sequence split over ranks (LASP-2 state exchange)
    cp_backend: CPBackend = "auto"  # fla: fla.ops.cp in fla's kernels; own: our exchange; auto: fla where it runs
    pp: int = 1  # pipeline stages (contiguous slices of layers)
    pp_schedule: PPSchedule = "1F1B"  # torch.distributed.pipelining schedule
    pp_microbatches: int = 0  # micro-batches per pipeline step (0 = one per stage)

    def resolved(self, world_size: int) -> ParallelConfig:
        """A copy with `dp_shard` filled in (`-1` -> the ranks left over); the product is checked by `check`."""
        if self.dp_shard != -1:
            return self
        others = self.dp_replicate * self.cp * self.tp * self.pp
        if others < 1 or world_size % others:
            raise ConfigError(
                f"parallel: dp_replicate*cp*tp*pp={others} does not divide the world size {world_size}; "
                "change the dimensions or the number of processes"
            )
        return replace(self, dp_shard=world_size // others)

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, d) for d in DIMS)

    @property
    def dp(self) -> int:
        """Ranks that read different rows of the batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def expert_shard(self) -> int:
        """Ranks the experts are FSDP-sharded over (`dp_shard * cp / ep`)."""
        return self.dp_shard * self.cp // self.ep

    def describe(self) -> str:
        """`dp_replicate=1 dp_shard=2 ep=2 (world 2)`: the dimensions above 1 (all when none is), and
        `expert_tp=false` when tp runs the MoE layers replicated."""
        dims = [d for d in (*DIMS, "ep") if getattr(self, d) != 1] or ["dp_shard"]
        replicated = " expert_tp=false" if self.tp > 1 and not self.expert_tp else ""
        return " ".join(f"{d}={getattr(self, d)}" for d in dims) + replicated + f" (world {self.world_size})"


def check_layout(
    cfg: ParallelConfig, world_size: int, model: Any, seq_len: int, micro_batch_size: int = 0
) -> ParallelConfig:
    """The resolved `cfg` for `world_size` processes, a `ModelConfig`, the sequence length and the rows of a
    micro-batch over all data-parallel ranks (0: unchecked), or a one-line ConfigError naming the dimension
    that does not fit."""
    for name in (*DIMS, "ep", "pp_microbatches"):
        value = getattr(cfg, name)
        if value < (0 if name == "pp_microbatches" else 1) and not (name == "dp_shard" and value == -1):
            raise ConfigError(f"parallel.{name} must be at least 1 (dp_shard: or -1 for the rest), got {value}")
    if cfg.cp_backend not in CP_BACKENDS:
        raise ConfigError(f"parallel.cp_backend must be one of {', '.join(CP_BACKENDS)}, got {cfg.cp_backend!r}")
    cfg = cfg.resolved(world_size)
    if cfg.world_size != world_size:
        product = "*".join(str(getattr(cfg, d)) for d in DIMS)
        raise ConfigError(
            f"parallel: dp_replicate*dp_shard*cp*tp*pp = {product} = {cfg.world_size} but {world_size} processes "
            "run; make the product equal the number of processes (dp_shard=-1 takes the rest)"
        )
    if (cfg.dp_shard * cfg.cp) % cfg.ep:
        raise ConfigError(
            f"parallel.ep={cfg.ep} must divide dp_shard*cp={cfg.dp_shard * cfg.cp} (expert parallelism borrows "
            "data-parallel ranks)"
        )
    kv_heads = getattr(model, "num_kv_heads", None) or model.num_heads
    for what, count in (("model.num_heads", model.num_heads), ("model.num_kv_heads", kv_heads)):
        if count % cfg.tp:
            raise ConfigError(f"parallel.tp={cfg.tp} must divide {what}={count}")
    moe = getattr(model, "moe", None)
    if cfg.ep > 1 and moe is None:
        raise ConfigError(f"parallel.ep={cfg.ep} needs an MoE model (model.moe is null); use parallel.ep=1")
    if moe is not None and moe.num_experts % cfg.ep:
        raise ConfigError(f"parallel.ep={cfg.ep} must divide model.moe.num_experts={moe.num_experts}")
    if moe is not None and cfg.expert_tp:
        widths = (
            ("expert_ffn_hidden_size", moe.expert_ffn_hidden_size),
            ("shared_expert_ffn_hidden_size", moe.shared_ffn_size),
        )
        for what, width in widths:
            if width % cfg.tp:
                raise ConfigError(
                    f"parallel.tp={cfg.tp} must divide model.moe.{what}={width} (each tp rank holds a slice of "
                    "every expert); change it or set parallel.expert_tp=false"
                )
    if model.num_layers % cfg.pp:
        raise ConfigError(f"parallel.pp={cfg.pp} must divide model.num_layers={model.num_layers}")
    if seq_len % cfg.cp:
        raise ConfigError(f"parallel.cp={cfg.cp} must divide data.seq_len={seq_len}")
    if micro_batch_size % cfg.dp:
        raise ConfigError(
            f"data.micro_batch_size={micro_batch_size} (rows over all data-parallel ranks) must be a multiple of "
            f"dp_replicate*dp_shard={cfg.dp}"
        )
    return cfg


def run_layout(run: Any) -> ParallelConfig:
    """The checked layout of a `RunConfig` over the current process group (one process without one)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return check_layout(run.parallel, world, run.model, run.data.seq_len, run.data.micro_batch_size)
