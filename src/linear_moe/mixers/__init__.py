"""Token mixers: one file per method, one registry.

`MIXERS[name]` is the layer class; `build_mixer(name, hidden_size, num_heads, layer_idx, num_layers, **kwargs)`
builds it with a clear error for an unknown name or option. Modules import lazily so that `import linear_moe`
stays light. A new mixer is one file plus one line below (or `MIXERS.register(name, cls)` from outside the
package); its contract is in `mixers/base.py`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping

from linear_moe.mixers.base import Mixer, MixerContext, MixerState, StateSpec


class _Registry(Mapping[str, type[Mixer]]):
    """name -> mixer class; built-in entries are "module:Class" paths under linear_moe.mixers, imported on first
    use. `register(name, cls)` adds a mixer defined anywhere (a user's own file)."""

    def __init__(self, paths: dict[str, str]):
        self._paths: dict[str, str | type[Mixer]] = dict(paths)

    def __getitem__(self, name: str) -> type[Mixer]:
        if name not in self._paths:
            raise KeyError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(self._paths))}")
        entry = self._paths[name]
        if isinstance(entry, type):
            return entry
        module, cls = entry.split(":")
        return getattr(importlib.import_module(f"linear_moe.mixers.{module}"), cls)

    def register(self, name: str, cls: type[Mixer]) -> type[Mixer]:
        """Add mixer `cls` (a `Mixer` subclass) under `name`; usable as a decorator. Names are unique."""
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register({name!r}, ...): expected a Mixer subclass, got {cls!r}")
        if name in self._paths:
            raise ValueError(f"mixer {name!r} is already registered")
        self._paths[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._paths.pop(name, None)

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


def build_mixer(
    name: str, hidden_size: int, num_heads: int, layer_idx: int = 0, num_layers: int | None = None, **kwargs
) -> Mixer:
    """Build mixer `name` for layer `layer_idx` of `num_layers`; unknown names, options and bad sizes get a one-line
    error naming the valid choices. `num_layers` reaches the mixers that declare `uses_num_layers` (depth-dependent
    inits) unless `kwargs` sets it."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(sorted(MIXERS))}")
    if num_heads <= 0 or hidden_size % num_heads != 0:
        raise ValueError(
            f"mixer {name!r}: num_heads={num_heads} must divide hidden_size={hidden_size} "
            f"(e.g. num_heads in {[h for h in (1, 2, 4, 8, 16, 32) if hidden_size % h == 0]})"
        )
    cls = MIXERS[name]
    if cls.uses_num_layers and kwargs.get("num_layers") is None:
        kwargs["num_layers"] = num_layers
    try:
        return cls(hidden_size=hidden_size, num_heads=num_heads, layer_idx=layer_idx, **kwargs)
    except TypeError as e:  # an option the constructor does not take: say which ones it does
        if "unexpected keyword argument" not in str(e):
            raise
        params = inspect.signature(cls.__init__).parameters
        options = [n for n in params if n not in ("self", "hidden_size", "num_heads", "layer_idx")]
        unknown = sorted(set(kwargs) - set(options))
        raise ValueError(
            f"mixer {name!r}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(options)}"
        ) from None


__all__ = ["MIXERS", "Mixer", "MixerContext", "MixerState", "StateSpec", "build_mixer"]
