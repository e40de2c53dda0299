"""Token mixers: one file per method, one registry.

`MIXERS[name]` is the layer class; `build_mixer(name, hidden_size, num_heads, **kwargs)` builds it
with a clear error for an unknown name. Modules import lazily so that `import linear_moe` stays light.
A new mixer is one file plus one line below.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping

from linear_moe.mixers.base import Mixer, MixerState


class _Registry(Mapping[str, type[Mixer]]):
    def __init__(self, paths: dict[str, str]):
        self._paths = paths

    def __getitem__(self, name: str) -> type[Mixer]:
        if name not in self._paths:
            raise KeyError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(self._paths))}")
        module, cls = self._paths[name].split(":")
        return getattr(importlib.import_module(f"linear_moe.mixers.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


MIXERS = _Registry(
    {
        "retnet": "retnet:MultiScaleRetention",
        "gla": "gla:GatedLinearAttention",
        "lightning_attn": "lightning_attn:LightningAttention",
        "based": "based:BasedLinearAttention",
        "rebased": "rebased:ReBasedLinearAttention",
        "linear_attn": "linear_attn:LinearAttention",
        "deltanet": "deltanet:DeltaNet",
        "gated_deltanet": "gated_deltanet:GatedDeltaNet",
        "mamba2": "mamba2:Mamba2",
        "rwkv6": "rwkv6:RWKV6Attention",
        "rwkv7": "rwkv7:RWKV7Attention",
        "hgrn": "hgrn:HGRNAttention",
        "hgrn2": "hgrn2:HGRN2Attention",
        "attention": "attention:Attention",
    }
)


def build_mixer(name: str, hidden_size: int, num_heads: int, layer_idx: int = 0, **kwargs) -> Mixer:
    """Build mixer `name`; unknown names and bad sizes get a one-line error naming the valid choices."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}")
    if num_heads <= 0 or hidden_size % num_heads != 0:
        raise ValueError(
            f"mixer {name!r}: num_heads={num_heads} must divide hidden_size={hidden_size} "
            f"(e.g. num_heads in {[h for h in (1, 2, 4, 8, 16, 32) if hidden_size % h == 0]})"
        )
    cls = MIXERS[name]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = [n for n in params if n not in ("self", "hidden_size", "num_heads", "layer_idx")]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise ValueError(
                f"mixer {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(options)}"
            )
    return cls(hidden_size=hidden_size, num_heads=num_heads, layer_idx=layer_idx, **kwargs)


__all__ = ["MIXERS", "Mixer", "MixerState", "build_mixer"]
