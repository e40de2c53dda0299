"""The Linear-MoE causal LM: `ModelConfig`, `LinearMoEForCausalLM`, presets, parameter and FLOP counts."""

from linear_moe.model.config import ModelConfig
from linear_moe.model.flops import count_params, flops_per_token
from linear_moe.model.lm import LinearMoEForCausalLM, LMOutput
from linear_moe.model.presets import PRESETS, get_preset

__all__ = [
    "PRESETS",
    "LMOutput",
    "LinearMoEForCausalLM",
    "ModelConfig",
    "count_params",
    "flops_per_token",
    "get_preset",
]
