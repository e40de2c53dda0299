"""Exact parameter counts from a `ModelConfig` and training FLOPs per token."""

from __future__ import annotations

import torch

from linear_moe.model.config import ModelConfig


def _meta_model(cfg: ModelConfig):
    from linear_moe.model.lm import LinearMoEForCausalLM

    with torch.device("meta"):
        return LinearMoEForCausalLM(cfg)


def count_params(cfg: ModelConfig, active: bool = False, embeddings: bool = True) -> int:
    """Number of parameters (tied weights once)."""
    model = _meta_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    if not embeddings:
        n -= model.embed_tokens.weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token = 3 x forward (2 x matmul params incl. LM head + mixers' sequence FLOPs)."""
    model = _meta_model(cfg)
    matmul = count_params(cfg, active=True, embeddings=False)
    if cfg.tie_embeddings:
        matmul += model.embed_tokens.weight.numel()
    fwd = 2 * matmul + sum(b.mixer.sequence_flops(seq_len) for b in model.layers)
    return 3.0 * fwd
