"""Building blocks the mixers share, registered on the mixer itself so that parameter names stay fla's
(`q_proj`, `q_conv1d`, `g_proj`, `g_norm`, `o_proj`, ...):

- `Projections`: input projections `<name>_proj` with optional depthwise short convolutions `<name>_conv1d`
  (state keys `conv_<name>`), run together by `project`.
- `GatedOutput`: the output norm (per head or over all heads), an optional output gate `g_proj` and `o_proj`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.layers.norm import GatedRMSNorm, RMSNorm
from linear_moe.mixers.base import Mixer, MixerState, StateSpec


class Projections(Mixer):
    """Mixin: `<name>_proj` linear maps from the hidden states and, with `use_short_conv`, a `<name>_conv1d` on each
    (their states are `conv_<name>` [C, W-1] in the compute dtype)."""

    use_short_conv: bool = False

    def add_projections(
        self,
        dims: dict[str, int],
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        conv_activation: str | None | dict[str, str | None] = "silu",
        bias: bool = False,
    ) -> None:
        """Register `<name>_proj` (hidden_size -> dims[name]) and, with `use_short_conv`, `<name>_conv1d` (activation
        per name when `conv_activation` is a dict)."""
        self.proj_dims, self.use_short_conv = dict(dims), use_short_conv
        for name, dim in dims.items():
            setattr(self, f"{name}_proj", nn.Linear(self.hidden_size, dim, bias=bias))
        if use_short_conv:
            if conv_size < 2:
                raise ValueError(f"{type(self).__name__}: conv_size must be >= 2, got {conv_size}")
            for name, dim in dims.items():
                act = conv_activation.get(name) if isinstance(conv_activation, dict) else conv_activation
                setattr(self, f"{name}_conv1d", ShortConvolution(dim, conv_size, activation=act, bias=conv_bias))

    def conv_spec(self) -> dict[str, StateSpec]:
        if not self.use_short_conv:
            return {}
        convs = {n: getattr(self, f"{n}_conv1d") for n in self.proj_dims}  # each holds its last W-1 inputs
        return {
            f"conv_{n}": StateSpec((c.dim, c.kernel_size - 1), None, "window", c.kernel_size - 1)
            for n, c in convs.items()
        }

    def project(
        self,
        x: torch.Tensor,
        state: MixerState | None,
        cu_seqlens: torch.Tensor | None,
        keep: bool,
        cp_context: Any = None,
    ) -> tuple[list[torch.Tensor], MixerState]:
        """x [B, T, D] -> one [B, T, dims[name]] per projection (in `dims` order, after the short convs) and the new
        conv states (empty unless `keep`: training skips computing them). `cp_context`: fla's context parallelism,
        handed to the short convs (mixers/base.py)."""
        outs, new_state = [], {}
        for name in self.proj_dims:
            y = getattr(self, f"{name}_proj")(x)
            if self.use_short_conv:
                conv = getattr(self, f"{name}_conv1d")
                conv_state = None if state is None else state[f"conv_{name}"]
                y, s = conv(y, conv_state, cu_seqlens, output_final_state=keep, cp_context=cp_context)
                if keep:
                    new_state[f"conv_{name}"] = s
            outs.append(y)
        return outs, new_state


class GatedOutput(Mixer):
    """Mixin: `o_proj(norm(o, g_proj(x)))` with an output gate, `o_proj(norm(o))` without; the RMSNorm runs over
    groups of `norm_dim` channels of the flattened heads (one head, or all heads)."""

    def add_output(
        self,
        value_dim: int,
        norm_dim: int,
        gate: str | None,
        norm_eps: float,
        norm_name: str = "o_norm",
        elementwise_affine: bool = True,
    ) -> None:
        """`gate`: the gate activation ('swish' / 'sigmoid') or None for no output gate."""
        self.out_norm_name, self.out_norm_dim, self.use_output_gate = norm_name, norm_dim, gate is not None
        if gate is not None:
            self.g_proj = nn.Linear(self.hidden_size, value_dim, bias=False)
            norm = GatedRMSNorm(norm_dim, eps=norm_eps, activation=gate)
            if not elementwise_affine:
                norm.weight = None
        else:
            norm = RMSNorm(norm_dim, eps=norm_eps, elementwise_affine=elementwise_affine)
        setattr(self, norm_name, norm)
        self.o_proj = nn.Linear(value_dim, self.hidden_size, bias=False)

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, V] (or [B, T, H*V]) and the mixer input x [B, T, D] -> [B, T, D]."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, -1, self.out_norm_dim)
        norm = getattr(self, self.out_norm_name)
        if self.use_output_gate:
            o = norm(o, self.g_proj(x).view(B, T, -1, self.out_norm_dim))
        else:
            o = norm(o)
        return self.o_proj(o.flatten(-2))
