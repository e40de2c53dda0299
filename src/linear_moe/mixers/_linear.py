"""Plumbing shared by the linear-attention mixers (RetNet, GLA, Lightning, linear attention, Based, ReBased):
head sizes from expand ratios, q/k/v projections with optional short convolutions and grouped k/v heads.
(Input/state checks, the kernel choice and the chunked FLOP count come from `_recurrent`.)
"""

from __future__ import annotations

import math

import torch

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._parts import GatedOutput, Projections
from linear_moe.mixers.base import MixerState, StateSpec


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


class LinearMixer(Projections, GatedOutput):
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
        dims = {"q": self.key_dim, "k": num_kv_heads * head_k_dim, "v": num_kv_heads * head_v_dim}
        self.add_projections(dims, use_short_conv, conv_size, conv_bias)

    def _init_output(self, use_output_gate: bool, gate_fn: str, norm_eps: float, norm_per_head: bool = True) -> None:
        """Output norm (+ gate) and o_proj: `g_norm_swish_gate(o, g_proj(x))` (fla's name for the swish gate),
        `g_norm(o, g_proj(x))` for a sigmoid gate, `g_norm(o)` without gate; RMSNorm per head or over all heads."""
        if gate_fn not in ("swish", "sigmoid"):
            raise ValueError(f"{type(self).__name__}: gate_fn must be 'swish' or 'sigmoid', got {gate_fn!r}")
        name = "g_norm_swish_gate" if use_output_gate and gate_fn == "swish" else "g_norm"
        norm_dim = self.head_v_dim if norm_per_head else self.value_dim
        self.add_output(self.value_dim, norm_dim, gate_fn if use_output_gate else None, norm_eps, name)

    def project_qkv(
        self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None, keep: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MixerState]:
        """x [B, T, D] -> q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] and the new conv states (when
        `keep`). Head counts come from the shapes (tensor parallelism shards heads)."""
        (q, k, v), conv_state = self.project(x, state, cu_seqlens, keep)
        K, V = self.head_k_dim, self.head_v_dim
        return q.unflatten(-1, (-1, K)), k.unflatten(-1, (-1, K)), v.unflatten(-1, (-1, V)), conv_state

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

    def linear_spec(self, key_dim: int, normalize: bool) -> dict[str, StateSpec]:
        """`recurrent` [H, key_dim, V], `normalizer` [1, H, key_dim] (with `normalize`), and the conv states."""
        spec = {"recurrent": StateSpec((self.num_heads, key_dim, self.head_v_dim), kind="diagonal")}  # no decay
        if normalize:
            spec["normalizer"] = StateSpec((1, self.num_heads, key_dim), kind="diagonal")
        return {**spec, **self.conv_spec()}
