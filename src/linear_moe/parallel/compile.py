"""torch.compile applied per block, and the step options of `train` / `bench model` in their fixed order."""

from __future__ import annotations

from torch import nn

from .checkpointing import apply_activation_checkpointing, apply_expert_checkpointing, transformer_blocks


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block in place (parameter names are unchanged)."""
    for block in transformer_blocks(model):
        block.compile()


def apply_step_options(
    model: nn.Module, activation_checkpointing: bool, checkpoint_experts: bool, compile: bool
) -> None:
    """The recomputation and compilation options of `train` (and `bench model`), in place: whole-block
    activation checkpointing, else checkpointing of the routed experts only (the block already covers them),
    then torch.compile of each block."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    elif checkpoint_experts:
        apply_expert_checkpointing(model)
    if compile:
        compile_blocks(model)
