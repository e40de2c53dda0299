"""Scale-out applied to a built model from outside its layers: the run's layout (`ParallelConfig`), its DeviceMesh,
FSDP2, expert / tensor / context / pipeline parallelism, activation checkpointing and per-block compilation.
See docs/parallel.md."""

from .checkpointing import apply_activation_checkpointing, apply_expert_checkpointing, moe_layers, transformer_blocks
from .compile import StepOptions, apply_step_options, compile_blocks
from .config import ParallelConfig, check_layout
from .mesh import ParallelMesh, build_mesh
from .parallelize import parallelize

__all__ = [
    "ParallelConfig",
    "ParallelMesh",
    "StepOptions",
    "apply_activation_checkpointing",
    "apply_expert_checkpointing",
    "apply_step_options",
    "build_mesh",
    "check_layout",
    "compile_blocks",
    "moe_layers",
    "parallelize",
    "transformer_blocks",
]
