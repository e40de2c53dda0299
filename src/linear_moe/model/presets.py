"""Named model configurations: `get_preset(name)`; override fields with `cfg.replace(mixer=..., layer_pattern=...)`."""

from __future__ import annotations

from collections.abc import Callable

from linear_moe.model.config import ModelConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "debug-dense": lambda: ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
                                       max_seq_len=256),
}
PRESETS = tuple(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh `ModelConfig` for preset `name`."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return _PRESETS[name]()
