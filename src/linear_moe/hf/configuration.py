"""`LinearMoEConfig`: the transformers config of an exported Linear-MoE model (needs transformers).

The whole `ModelConfig` travels as the dict `linear_moe`; the standard fields transformers reads
(`vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`, `tie_word_embeddings`) follow it.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from linear_moe.model import ModelConfig


class LinearMoEConfig(PretrainedConfig):
    model_type = "linear_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, linear_moe: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any):
        cfg = ModelConfig.from_dict(linear_moe) if linear_moe is not None else ModelConfig()
        self.linear_moe = cfg.to_dict()
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.hidden_size
        self.num_hidden_layers = cfg.num_layers
        self.num_attention_heads = cfg.num_heads
        self.max_position_embeddings = cfg.max_seq_len
        kwargs["tie_word_embeddings"] = cfg.tie_embeddings
        self.use_cache = use_cache
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` this config carries."""
        return ModelConfig.from_dict(self.linear_moe)
