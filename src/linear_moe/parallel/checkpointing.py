"""Activation recomputation applied from outside the layers: whole blocks, or only the routed experts."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model, `model.layers` (the unit of checkpointing, compilation and sharding); a
    pipeline rank's part keeps them in a ModuleDict under their model indices."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no `layers` ModuleList of blocks to checkpoint or compile")
    return list(layers)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE layers in layer order (`model.moe_layers()`; none for a dense model)."""
    return list(model.moe_layers()) if hasattr(model, "moe_layers") else []


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant); parameter names are unchanged."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def apply_expert_checkpointing(model: nn.Module) -> None:
    """Recompute the routed experts of every MoE layer in backward (non-reentrant): only their [tokens * k, D]
    input is kept, not the [tokens * k, 2F] gate|up output and the [tokens * k, F] SwiGLU output, for one more
    expert forward per step. Parameter names are unchanged."""
    for moe in moe_layers(model):
        moe.experts.forward = functools.partial(checkpoint, moe.experts.forward, use_reentrant=False)
