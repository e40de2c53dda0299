"""`parallelize`: apply a run's layout to a built model from outside its layers, in torchtitan's order:
pipeline split -> tensor parallel -> expert parallel -> context parallel -> checkpointing / compile / offload ->
FSDP2. Under pipeline parallelism the result is this rank's part (`PipelinedModel`, whose `runner` runs a step).

Every rank builds the whole model from the same seed, so sharding starts from the single-process initialisation
and a run's parameters do not depend on its layout.
"""

from __future__ import annotations

import torch
from torch import nn

from .compile import StepOptions, apply_step_options
from .config import ParallelConfig
from .mesh import ParallelMesh


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    mesh: ParallelMesh | None,
    *,
    device: torch.device,
    options: StepOptions | None = None,
    param_dtype: torch.dtype | None = None,
    seq_len: int | None = None,
) -> nn.Module:
    """`model` on `device`, split by the resolved `cfg` over `mesh` (None: one process, no process group).

    `param_dtype` is FSDP2's compute dtype for parameters (bf16 on GPU; None keeps float32, e.g. on CPU).
    `seq_len` is the length of the rows packed into the `[1, B*T]` batches: the sequences of the MoE layers'
    sequence-wise balance loss (None: each input row is one sequence).
    """
    model = model.to(device)
    if mesh is not None and cfg.pp > 1:  # first split the layers: everything below applies to this rank's stages
        from .pp import PipelineRunner

        if cfg.tp > 1 or cfg.cp > 1:
            raise ValueError("parallel.pp does not combine with tp or cp yet; use pp with dp_shard / dp_replicate / ep")
        model = PipelineRunner(model, mesh, cfg.pp_schedule, cfg.pp_microbatches, device).model
    if mesh is not None and cfg.tp > 1:
        from .tp import apply_tp

        apply_tp(model, mesh, cfg.expert_tp)
    if mesh is not None and cfg.ep > 1:
        from .ep import apply_ep

        apply_ep(model, mesh)
    from .ep import apply_global_stats

    apply_global_stats(model, mesh, seq_len)
    if mesh is not None and cfg.cp > 1:
        from .cp import apply_cp

        apply_cp(model, mesh, cfg.cp_backend)
    apply_step_options(model, options or StepOptions())
    if mesh is not None:
        from .fsdp import apply_fsdp

        expert_mesh = mesh.experts["dp_replicate", "efsdp"] if cfg.ep > 1 else None
        apply_fsdp(model, mesh.fsdp["dp_replicate", "dp_shard_cp"], expert_mesh, param_dtype)
    return model
