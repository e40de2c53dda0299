"""torch.compile applied per block, and the step options of `train` / `bench model` in their fixed order."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from .checkpointing import (
    apply_activation_checkpointing,
    apply_activation_offload,
    apply_expert_checkpointing,
    transformer_blocks,
)


@dataclass(frozen=True)
class StepOptions:
    """How a step trades memory for time, and compiles: the `train.*` keys (and `bench model` flags) of one name."""

    activation_checkpointing: bool = False  # recompute each block in backward
    checkpoint_experts: bool = False  # recompute only the routed experts (ignored under activation_checkpointing)
    expert_chunk: int = 0  # run the routed experts in chunks of this many tokens, each recomputed (0: off)
    offload_activations: bool = False  # what backward keeps lives in host memory (with checkpointing: block inputs)
    compile: bool = False  # torch.compile each block

    @classmethod
    def of(cls, source: Any) -> StepOptions:
        """The options read from the same-named attributes of `source` (a TrainConfig, parsed bench flags)."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls)})


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names are unchanged)."""
    for block in transformer_blocks(model):
        block.compile()


def apply_step_options(model: nn.Module, options: StepOptions) -> None:
    """The recomputation, offload and compilation options of `train` (and `bench model`), in place: whole-block
    activation checkpointing, else checkpointing of the routed experts only (the block already covers them);
    chunked expert recomputation (inside a checkpointed block too); then torch.compile of each block, and the
    host-memory offload of what the whole forward saves for backward."""
    if options.activation_checkpointing:
        apply_activation_checkpointing(model)
    elif options.checkpoint_experts and not options.expert_chunk:
        apply_expert_checkpointing(model)
    if options.expert_chunk:
        apply_expert_checkpointing(model, chunk_tokens=options.expert_chunk)
    if options.compile:
        compile_blocks(model)
    if options.offload_activations:
        apply_activation_offload(model)
