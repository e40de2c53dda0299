"""Exact parameter counts from a `ModelConfig`, and training FLOPs per token.

Counts are analytic for the embedding, norms, LM head, dense SwiGLU FFNs and MoE FFNs (routed experts, router,
shared experts). A mixer's parameter count comes from building that mixer once on the `meta` device (no memory,
no compute): fourteen mixers with their options are not worth fourteen hand formulas that could drift.

FLOPs (the PaLM / nanoGPT convention, arXiv:2204.02311 appendix B): forward = 2 x active matmul parameters
(every weight a token is multiplied by, including the LM head, not the embedding lookup) + each layer's
`mixer.sequence_flops(seq_len)`; training = 3 x forward (backward = 2 x forward). Norms, activations, the
router softmax and the loss are elementwise and not counted.
"""

from __future__ import annotations

import functools
import json

import torch

from linear_moe.model.config import ModelConfig


@functools.lru_cache(maxsize=256)
def _meta_mixer(name: str, hidden_size: int, num_heads: int, layer_idx: int, num_layers: int, kwargs_json: str):
    from linear_moe.mixers import build_mixer

    with torch.device("meta"):
        return build_mixer(name, hidden_size, num_heads, layer_idx, num_layers, **json.loads(kwargs_json))


def _mixer(cfg: ModelConfig, i: int):
    """Layer `i`'s mixer, built on `meta` (cached per distinct configuration)."""
    kwargs = json.dumps(cfg.layer_mixer_kwargs(i), sort_keys=True)
    return _meta_mixer(cfg.layer_mixers()[i], cfg.hidden_size, cfg.num_heads, i, cfg.num_layers, kwargs)


def swiglu_params(hidden_size: int, ffn_hidden_size: int) -> int:
    """gate_proj + up_proj + down_proj, no biases."""
    return 3 * hidden_size * ffn_hidden_size


def moe_params(cfg: ModelConfig, active: bool) -> int:
    """One MoE FFN: routed experts (all, or top_k of them when `active`), router, shared experts."""
    from linear_moe.moe import moe_param_counts

    counts = moe_param_counts(cfg.moe, cfg.hidden_size)
    experts = counts["experts_active"] if active else counts["experts_total"]
    return experts + counts["router"] + counts["shared"]


def layer_params(cfg: ModelConfig, i: int, active: bool = False) -> int:
    """Parameters of block `i`: two RMSNorm weights, the mixer, the FFN."""
    ffn = moe_params(cfg, active) if cfg.is_moe_layer(i) else swiglu_params(cfg.hidden_size, cfg.ffn_hidden_size)
    return 2 * cfg.hidden_size + sum(p.numel() for p in _mixer(cfg, i).parameters()) + ffn


def count_params(cfg: ModelConfig, active: bool = False, embeddings: bool = True) -> int:
    """Number of parameters of `LinearMoEForCausalLM(cfg)` (tied weights counted once).

    active: count only the routed experts a token uses (top_k of num_experts) in MoE layers.
    embeddings: include the input embedding table (the LM head always counts; when tied, the shared
    matrix counts as the LM head).
    """
    emb = cfg.vocab_size * cfg.hidden_size
    n = sum(layer_params(cfg, i, active) for i in range(cfg.num_layers)) + cfg.hidden_size + emb  # + final norm + head
    if embeddings and not cfg.tie_embeddings:
        n += emb
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Active weights every token is multiplied by in the forward: all active parameters except norms, embedding
    lookup, and the non-matmul parameters of mixers (see `_mixer_matmul_params`)."""
    n = cfg.vocab_size * cfg.hidden_size  # LM head
    for i in range(cfg.num_layers):
        ffn = moe_params(cfg, True) if cfg.is_moe_layer(i) else swiglu_params(cfg.hidden_size, cfg.ffn_hidden_size)
        n += _mixer_matmul_params(cfg, i) + ffn
    return n


def _mixer_matmul_params(cfg: ModelConfig, i: int) -> int:
    """Weights a token is multiplied by in the mixer: nn.Linear projections and short-convolution kernels
    (a depthwise conv of width W costs D*W multiply-adds per token). Norm weights, biases, decay and gate
    vectors act elementwise and are not counted."""
    from linear_moe.layers.conv import ShortConvolution

    mods = _mixer(cfg, i).modules()
    return sum(m.weight.numel() for m in mods if isinstance(m, (torch.nn.Linear, ShortConvolution)))


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x active matmul weights + the mixers' sequence FLOPs."""
    seq = sum(_mixer(cfg, i).sequence_flops(seq_len) for i in range(cfg.num_layers))
    return 2.0 * matmul_params(cfg) + seq


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) at sequence length `seq_len`."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)
