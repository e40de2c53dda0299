"""Plumbing shared by the linear-attention mixers (RetNet, GLA, Lightning, linear attention, Based, ReBased):
head sizes from expand ratios, q/k/v projections with optional short convolutions and grouped k/v heads.
(Input/state checks, the kernel choice and the chunked FLOP count come from `_recurrent`.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.layers.norm import GatedRMSNorm, RMSNorm
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import Mixer, MixerState


def head_dims(
    name: str, hidden_size: int, num_heads: int, expand_k: float, expand_v: float, num_kv_heads: int | None
) -> tuple[int, int, int]:
    """(head_k_dim, head_v_dim, num_kv_heads) from fla's expand ratios, with one-line errors."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
            f"(valid: {[h for h in range(1, num_heads + 1) if num_heads % h == 0]})"
        )
    dims = []
    for label, ratio in (("expand_k", expand_k), ("expand_v", expand_v)):
        total = hidden_size * ratio
        if total <= 0 or not math.isclose(total, round(total)) or round(total) % num_heads:
            raise ValueError(
                f"{name}: hidden_size * {label} = {total} must be a positive integer divisible by num_heads={num_heads}"
            )
        dims.append(round(total) // num_heads)
    return dims[0], dims[1], num_kv_heads


class LinearMixer(Mixer):
    """Base of the linear-attention mixers: q_proj, k_proj, v_proj (k/v with `num_kv_heads` heads), optional
    depthwise causal convolutions q_conv1d, k_conv1d, v_conv1d (silu) with state keys conv_q, conv_k, conv_v."""

    def _init_qkv(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int,
        head_k_dim: int,
        head_v_dim: int,
        num_kv_heads: int,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
    ) -> None:
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_k_dim, self.head_v_dim, self.num_kv_heads = head_k_dim, head_v_dim, num_kv_heads
        self.key_dim, self.value_dim = num_heads * head_k_dim, num_heads * head_v_dim
        kv_k, kv_v = num_kv_heads * head_k_dim, num_kv_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_k, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_v, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            if conv_size < 2:
                raise ValueError(f"{type(self).__name__}: conv_size must be >= 2, got {conv_size}")
            self.q_conv1d = ShortConvolution(self.key_dim, conv_size, activation="silu", bias=conv_bias)
            self.k_conv1d = ShortConvolution(kv_k, conv_size, activation="silu", bias=conv_bias)
            self.v_conv1d = ShortConvolution(kv_v, conv_size, activation="silu", bias=conv_bias)

    def _init_output(self, use_output_gate: bool, gate_fn: str, norm_eps: float, norm_per_head: bool = True) -> None:
        """Output norm (+ gate) and o_proj: `g_norm_swish_gate(o, g_proj(x))` (fla's name for the swish gate),
        `g_norm(o, g_proj(x))` for a sigmoid gate, `g_norm(o)` without gate; RMSNorm per head or over all heads."""
        if gate_fn not in ("swish", "sigmoid"):
            raise ValueError(f"{type(self).__name__}: gate_fn must be 'swish' or 'sigmoid', got {gate_fn!r}")
        self.use_output_gate, self.norm_per_head = use_output_gate, norm_per_head
        dim = self.head_v_dim if norm_per_head else self.value_dim
        if use_output_gate:
            self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
            self._norm_name = "g_norm_swish_gate" if gate_fn == "swish" else "g_norm"
            setattr(self, self._norm_name, GatedRMSNorm(dim, eps=norm_eps, activation=gate_fn))
        else:
            self._norm_name = "g_norm"
            self.g_norm = RMSNorm(dim, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def output(self, o_BTHV: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Normalise (and gate) the op output [B, T, H, V] and project back to [B, T, hidden_size]."""
        shape = (self.num_heads, self.head_v_dim) if self.norm_per_head else (1, self.value_dim)
        o = o_BTHV.reshape(*o_BTHV.shape[:2], *shape)
        norm = getattr(self, self._norm_name)
        o = norm(o, self.g_proj(x).unflatten(-1, shape)) if self.use_output_gate else norm(o)
        return self.o_proj(o.flatten(-2))

    def conv_keys(self) -> list[str]:
        return rec.conv_state_keys("qkv") if self.use_short_conv else []

    def project_qkv(
        self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None, keep: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MixerState]:
        """x [B, T, D] -> q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] and the new conv states (when
        `keep`)."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state: MixerState = {}
        if self.use_short_conv:
            convs = {"q": self.q_conv1d, "k": self.k_conv1d, "v": self.v_conv1d}
            (q, k, v), conv_state = rec.run_short_convs(convs, {"q": q, "k": k, "v": v}, state, cu_seqlens, keep)
        return (
            q.unflatten(-1, (self.num_heads, self.head_k_dim)),
            k.unflatten(-1, (self.num_kv_heads, self.head_k_dim)),
            v.unflatten(-1, (self.num_kv_heads, self.head_v_dim)),
            conv_state,
        )

    def repeat_kv(self, *ts: torch.Tensor) -> list[torch.Tensor]:
        """Grouped heads [B, T, Hkv, ...] -> [B, T, H, ...] (each k/v head serves H/Hkv query heads)."""
        g = self.num_heads // self.num_kv_heads
        return [t.repeat_interleave(g, dim=2) if g > 1 else t for t in ts]

    def run_linear_attn(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: MixerState | None,
        keep: bool,
        cu_seqlens: torch.Tensor | None,
        normalize: bool,
        scale: float | None,
    ) -> tuple[torch.Tensor, MixerState]:
        """The linear_attn op on q, k [B, T, H, K], v [B, T, H, V]; with `normalize` the running key sum is carried
        as state['normalizer'] [B, 1, H, K] next to state['recurrent'] [B, H, K, V]."""
        s0 = None
        if state is not None:
            s0 = (state["recurrent"], state["normalizer"]) if normalize else state["recurrent"]
        fn = rec.op("linear_attn", rec.use_recurrent_kernel(self, state, q.shape[1]))
        o, s = fn(
            q=q,
            k=k,
            v=v,
            scale=scale,
            initial_state=s0,
            output_final_state=keep,
            normalize=normalize,
            cu_seqlens=cu_seqlens,
        )
        if not keep:
            return o, {}
        return o, ({"recurrent": s[0], "normalizer": s[1]} if normalize else {"recurrent": s})

    def linear_state_keys(self, normalize: bool) -> list[str]:
        return ["recurrent", *(["normalizer"] if normalize else []), *self.conv_keys()]
