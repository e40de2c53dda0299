"""`ModelConfig`: one dataclass describing a Linear-MoE causal LM (round-trips through plain dicts / YAML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from linear_moe.moe import MoEConfig

PATTERN_LETTERS = {"L": "the configured mixer (`mixer`)", "N": "softmax attention"}


@dataclass
class ModelConfig:
    """A decoder-only LM: embedding -> `num_layers` pre-norm blocks (mixer + FFN) -> RMSNorm -> LM head.

    `layer_pattern` (None = every layer uses `mixer`) is one letter per layer, or a shorter string that tiles
    the layers exactly ("LLLN" for 12 layers = 3 x LLLN): L = `mixer` with `mixer_kwargs`, N = softmax
    attention with `num_kv_heads` / `rope_theta`. `moe` None -> dense SwiGLU FFNs of `ffn_hidden_size`;
    otherwise every layer from `first_k_dense` on is a `MoELayer` (the first k stay dense, DeepSeek-V2).
    """

    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    mixer: str = "attention"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    layer_pattern: str | None = None
    num_kv_heads: int | None = None  # softmax attention layers (N, or mixer == "attention")
    rope_theta: float = 10000.0
    ffn_hidden_size: int = 688  # dense SwiGLU FFN width (dense layers and `moe=None`)
    moe: MoEConfig | None = None
    first_k_dense: int = 0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 2048
    fuse_linear_cross_entropy: bool = True  # fla's fused linear CE on CUDA when fla is installed
    init_from: str | None = None  # a Hugging Face MoE directory to start from (linear_moe.hf, docs/hf.md)

    def __post_init__(self) -> None:
        from linear_moe.mixers import MIXERS

        if isinstance(self.moe, dict):  # ModelConfig(moe={...}) written by hand
            self.moe = MoEConfig(**self.moe)
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; valid mixers: {', '.join(sorted(MIXERS))}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(
                f"ModelConfig.first_k_dense={self.first_k_dense} must be in [0, num_layers={self.num_layers}]"
            )
        self.layer_mixers()  # validates layer_pattern

    def layer_mixers(self) -> list[str]:
        """The mixer name of each layer (expands `layer_pattern`)."""
        pattern = self.layer_pattern or "L"
        bad = sorted(set(pattern) - set(PATTERN_LETTERS))
        if bad:
            raise ValueError(
                f"layer_pattern {pattern!r} has unknown letters {bad}; valid letters: "
                + ", ".join(f"{k} = {v}" for k, v in PATTERN_LETTERS.items())
            )
        if self.num_layers % len(pattern):
            raise ValueError(
                f"layer_pattern {pattern!r} (length {len(pattern)}) must have num_layers={self.num_layers} "
                f"letters or tile them exactly (a length dividing {self.num_layers})"
            )
        full = pattern * (self.num_layers // len(pattern))
        return [self.mixer if c == "L" else "attention" for c in full]

    def layer_mixer_kwargs(self, i: int) -> dict[str, Any]:
        """Keyword arguments for `build_mixer` of layer `i`."""
        name = self.layer_mixers()[i]
        attn = {"num_kv_heads": self.num_kv_heads, "rope_theta": self.rope_theta}
        if name == "attention":
            return {**attn, **self.mixer_kwargs} if self.mixer == "attention" else attn
        return dict(self.mixer_kwargs)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i >= self.first_k_dense

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (YAML-safe)."""
        from linear_moe.config import to_dict

        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys -> one-line error listing the valid keys."""
        from linear_moe.config import from_dict

        return from_dict(cls, d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
