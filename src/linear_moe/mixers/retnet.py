"""RetNet's multi-scale retention token mixer."""

from __future__ import annotations

import torch

from linear_moe.mixers import _linear
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.feature_maps import ELEMENTWISE
from linear_moe.mixers.rotary import RotaryEmbedding, token_positions


def retention_log_decay(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """RetNet's fixed per-head decays gamma_h = 1 - 2^(-5-h), as log gamma [H] (float32; made per call, not a
    buffer, so that casting the model to bfloat16 cannot round it)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float32, device=device))))


class MultiScaleRetention(_linear.LinearMixer):
    """Multi-scale retention: S_t = gamma_h S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(d_k) with RoPE on q, k and
    gamma_h = 1 - 2^(-5-h), then per-head RMSNorm, a swish output gate and o_proj. "Retentive Network: A Successor
    to Transformer for Large Language Models", arXiv:2307.08621. Follows fla's `MultiScaleRetention`
    (`chunk_simple_gla` with a fixed `g_gamma`).

    Options (fla defaults):
        expand_k (1.0), expand_v (2.0): key / value width = hidden_size * ratio, split over heads.
        num_kv_heads (None -> num_heads): grouped k/v heads.
        feature_map (None): elementwise map on q, k (a name in feature_maps.ELEMENTWISE).
        use_short_conv (False), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
        use_output_gate (True), gate_fn ('swish' | 'sigmoid'), norm_eps (1e-5).
        rope_theta (10000.0): RoPE base.
        seq_split (0 = off), seq_split_local ('op'): run rows or packed documents longer than seq_split tokens
        through pieces of seq_split tokens side by side (`ops/split.py`, same results; see GatedLinearAttention).
    State: `recurrent` [B, H, K, V] (float32), `pos` [B] tokens seen (RoPE offset), conv_q/k/v [B, C, W-1].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 1.0,
        expand_v: float = 2.0,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        gate_fn: str = "swish",
        norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        seq_split: int = 0,
        seq_split_local: str = "op",
    ):
        super().__init__()
        rec.check_seq_split("MultiScaleRetention", seq_split, seq_split_local)
        if feature_map is not None and feature_map not in ELEMENTWISE:
            raise ValueError(
                f"MultiScaleRetention: unknown feature_map {feature_map!r}; valid: None, {', '.join(ELEMENTWISE)}"
            )
        hk, hv, hkv = _linear.head_dims("MultiScaleRetention", hidden_size, num_heads, expand_k, expand_v, num_kv_heads)
        if hk % 2:
            raise ValueError(f"MultiScaleRetention: head key dim {hk} must be even for RoPE (adjust expand_k)")
        self._init_qkv(hidden_size, num_heads, layer_idx, hk, hv, hkv, use_short_conv, conv_size, conv_bias)
        self._init_output(use_output_gate, gate_fn, norm_eps)
        self.feature_map_fn = None if feature_map is None else ELEMENTWISE[feature_map]
        self.rotary = RotaryEmbedding(hk, rope_theta)
        self.seq_split, self.seq_split_local = seq_split, seq_split_local

    def log_decay(self, device: torch.device | None = None) -> torch.Tensor:
        """log gamma_h of this module's heads h = head_offset .. head_offset + num_heads - 1, [H] float32."""
        return retention_log_decay(self.head_offset + self.num_heads, device)[self.head_offset :]

    def state_spec(self) -> dict[str, StateSpec]:
        return {
            "recurrent": StateSpec((self.num_heads, self.head_k_dim, self.head_v_dim), kind="diagonal"),  # gamma_h
            "pos": StateSpec((), torch.long, "position"),
            **self.conv_spec(),
        }

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q, k, v, new_state = self.project_qkv(x, state, cu_seqlens, keep)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        pos_BT, pos_end = token_positions(x, None if state is None else state["pos"], cu_seqlens)
        q, k = self.rotary(q, pos_BT), self.rotary(k, pos_BT)
        k, v = self.repeat_kv(k, v)
        if rec.use_recurrent_kernel(self, state, x.shape[1]):
            fn = rec.op("simple_gla", True)
        else:
            fn = rec.chunk_op("simple_gla", x.shape[1], self.seq_split, self.seq_split_local)
        o_BTHV, s = fn(
            q=q,
            k=k,
            v=v,
            g_gamma=self.log_decay(x.device),
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        y = self.output(o_BTHV, x)
        return y, {"recurrent": s, "pos": pos_end, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        return self.num_heads * rec.chunked_flops(seq_len, self.head_k_dim, self.head_v_dim)
