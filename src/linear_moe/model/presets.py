"""Named model configurations. A user picks a model as preset + overrides::

    cfg = get_preset("A0.3B-2B").replace(mixer="gated_deltanet", layer_pattern="LLLN")

Debug presets (one per MoE family, plus dense) are tiny models for tests and smoke runs. The Linear-MoE sizes
follow the paper (arXiv:2503.05447) and its training scripts (Qwen2 base model): Qwen2 tokenizer (151,643 + 293
extra = 151,936 tokens), untied embeddings, RoPE base 10,000, 64 routed experts, top-8, no shared expert.
A0.3B-2B: hidden 1024, 12 layers, 8 heads, expert FFN 896; A1B-7B: hidden 2048, 16 layers, 16 heads, expert
FFN 1024. The dense variants replace each MoE FFN by one SwiGLU FFN of the same active width (8 x expert FFN).
Exact parameter counts are in docs/models.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from linear_moe.model.config import ModelConfig
from linear_moe.moe import MoEConfig

QWEN2_VOCAB = 151_936
DEBUG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128, max_seq_len=256)


def _moe(family: str, **kwargs: Any) -> MoEConfig:
    """`MoEConfig` of one family (the MoE package's published defaults) with size overrides."""
    return MoEConfig.preset(family, **kwargs)


def _debug(family: str) -> ModelConfig:
    if family == "dense":
        return ModelConfig(**DEBUG)
    moe = _moe(family, num_experts=8, top_k=2, expert_ffn_hidden_size=32, init_std=0.02)
    first_k_dense = 1 if family.startswith("deepseek") else 0  # DeepSeek-V2/V3 keep the first layer(s) dense
    return ModelConfig(**DEBUG, moe=moe, first_k_dense=first_k_dense)


def _linear_moe(hidden: int, layers: int, heads: int, expert_ffn: int, dense: bool) -> ModelConfig:
    base = dict(
        vocab_size=QWEN2_VOCAB,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        max_seq_len=2048,
        rope_theta=10000.0,
    )
    if dense:
        return ModelConfig(**base, ffn_hidden_size=8 * expert_ffn)
    moe = _moe(
        "qwen2-moe",
        num_experts=64,
        top_k=8,
        expert_ffn_hidden_size=expert_ffn,
        num_shared_experts=0,
        shared_expert_gate=False,
        init_std=0.02,
    )
    return ModelConfig(**base, ffn_hidden_size=8 * expert_ffn, moe=moe)


_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    **{f"debug-{f}": (lambda f=f: _debug(f)) for f in ("dense", "mixtral", "qwen2-moe", "deepseek-v2", "deepseek-v3")},
    "A0.3B-2B": lambda: _linear_moe(1024, 12, 8, 896, dense=False),
    "A1B-7B": lambda: _linear_moe(2048, 16, 16, 1024, dense=False),
    "A0.3B-dense": lambda: _linear_moe(1024, 12, 8, 896, dense=True),
    "A1B-dense": lambda: _linear_moe(2048, 16, 16, 1024, dense=True),
}
PRESETS = tuple(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh `ModelConfig` for preset `name` (see `PRESETS`)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return _PRESETS[name]()
