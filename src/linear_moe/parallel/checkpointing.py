"""Activation recomputation applied from outside the layers: whole blocks, or only the routed experts (whole or in
chunks of tokens); and the offload of saved activations to host memory."""

from __future__ import annotations

import functools

import torch
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


def apply_expert_checkpointing(model: nn.Module, chunk_tokens: int = 0) -> None:
    """Recompute the routed experts of every MoE layer in backward (non-reentrant).

    Whole (`chunk_tokens=0`): only their [tokens * k, D] input is kept, not the [tokens * k, 2F] gate|up output and
    the [tokens * k, F] SwiGLU output, for one more expert forward per step. In chunks (`chunk_tokens > 0`, the
    layer's `recompute_chunk`): the experts run on that many tokens at a time, each chunk recomputed on its own, so
    even inside a recomputed block the expert activations of one chunk exist at once (long contexts). Parameter
    names are unchanged.
    """
    if chunk_tokens < 0:
        raise ValueError(f"expert_chunk must be >= 0 tokens (0: off), got {chunk_tokens}")
    for moe in moe_layers(model):
        if chunk_tokens:
            moe.recompute_chunk = chunk_tokens
        else:
            moe.experts.forward = functools.partial(checkpoint, moe.experts.forward, use_reentrant=False)


def apply_activation_offload(model: nn.Module) -> None:
    """Keep what the model's forward saves for backward in pinned host memory (`torch.autograd.graph.save_on_cpu`),
    copied back when backward needs it. Under activation checkpointing that is each block's input (the
    checkpoint's saved inputs), the embedding output and the loss inputs: device memory then no longer grows with
    the number of layers times the sequence length, for one host round trip of the residual stream per block."""
    forward = model.forward

    @functools.wraps(forward)
    def offloaded(*args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return forward(*args, **kwargs)

    model.forward = offloaded
