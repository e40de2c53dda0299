"""Gated linear attention (GLA) token mixer."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _linear
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.feature_maps import ELEMENTWISE


class GatedLinearAttention(_linear.LinearMixer):
    """Gated linear attention: S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(d_k), with a
    data-dependent per-channel forget gate log alpha_t = logsigmoid(gk_proj(x_t)) / gate_logit_normalizer
    (gk_proj a low-rank two-layer projection), then per-head RMSNorm, a swish output gate and o_proj.
    "Gated Linear Attention Transformers with Hardware-Efficient Training", arXiv:2312.06635.
    Follows fla's `GatedLinearAttention` (`chunk_gla` / `fused_recurrent_gla`).

    Options (fla defaults):
        expand_k (0.5), expand_v (1.0): key / value width = hidden_size * ratio, split over heads.
        num_kv_heads (None -> num_heads): grouped k/v heads (the key gate follows k).
        feature_map (None): elementwise map on q, k (a name in feature_maps.ELEMENTWISE).
        use_short_conv (False), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
        use_output_gate (True), gate_fn ('swish' | 'sigmoid'), norm_eps (1e-5).
        gate_logit_normalizer (16), gate_low_rank_dim (16), clamp_min (None): forget gate shape and lower bound
        on log alpha.
        seq_split (0 = off): in the chunked path, run rows, or packed documents (cu_seqlens), longer than this
        many tokens as pieces of seq_split tokens side by side (`ops/split.py`: same outputs, states and
        gradients; more parallel state passing on the GPU: 1 x 65,536 tokens +5% on the H200 with 2048 or 4096);
        seq_split_local ('op' | 'sum'): how the pieces' own final states are found (a chunk_gla run, or one
        matmul keeping float32 copies of k and v for backward).
    State: `recurrent` [B, H, K, V] (float32), conv_q/k/v [B, C, W-1] with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_kv_heads: int | None = None,
        feature_map: str | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        use_output_gate: bool = True,
        gate_fn: str = "swish",
        norm_eps: float = 1e-5,
        gate_logit_normalizer: float = 16,
        gate_low_rank_dim: int = 16,
        clamp_min: float | None = None,
        seq_split: int = 0,
        seq_split_local: str = "op",
    ):
        super().__init__()
        if feature_map is not None and feature_map not in ELEMENTWISE:
            raise ValueError(
                f"GatedLinearAttention: unknown feature_map {feature_map!r}; valid: None, {', '.join(ELEMENTWISE)}"
            )
        if gate_logit_normalizer <= 0 or gate_low_rank_dim <= 0:
            raise ValueError(
                f"GatedLinearAttention: gate_logit_normalizer ({gate_logit_normalizer}) and "
                f"gate_low_rank_dim ({gate_low_rank_dim}) must be positive"
            )
        rec.check_seq_split("GatedLinearAttention", seq_split, seq_split_local)
        hk, hv, hkv = _linear.head_dims(
            "GatedLinearAttention", hidden_size, num_heads, expand_k, expand_v, num_kv_heads
        )
        self._init_qkv(hidden_size, num_heads, layer_idx, hk, hv, hkv, use_short_conv, conv_size, conv_bias)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, hkv * hk, bias=True)
        )
        self._init_output(use_output_gate, gate_fn, norm_eps)
        self.feature_map_fn = None if feature_map is None else ELEMENTWISE[feature_map]
        self.gate_logit_normalizer, self.clamp_min = gate_logit_normalizer, clamp_min
        self.seq_split, self.seq_split_local = seq_split, seq_split_local

    def state_spec(self) -> dict[str, StateSpec]:
        shape = (self.num_heads, self.head_k_dim, self.head_v_dim)
        spec = {"recurrent": StateSpec(shape, kind="diagonal")}  # decay per key channel
        return {**spec, **self.conv_spec()}

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q, k, v, new_state = self.project_qkv(x, state, cu_seqlens, keep)
        gk_BTHK = F.logsigmoid(self.gk_proj(x).float().unflatten(-1, (self.num_kv_heads, self.head_k_dim)))
        gk_BTHK = gk_BTHK / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk_BTHK = gk_BTHK.clamp_min(self.clamp_min)
        if self.feature_map_fn is not None:
            q, k = self.feature_map_fn(q), self.feature_map_fn(k)
        k, v, gk_BTHK = self.repeat_kv(k, v, gk_BTHK)
        s0 = None if state is None else state["recurrent"]
        if rec.use_recurrent_kernel(self, state, x.shape[1]):
            o_BTHV, s = rec.op("gla", True)(
                q=q, k=k, v=v, gk=gk_BTHK, initial_state=s0, output_final_state=keep, cu_seqlens=cu_seqlens
            )
        else:
            fn = rec.chunk_op("gla", x.shape[1], self.seq_split, self.seq_split_local)
            o_BTHV, s = fn(q=q, k=k, v=v, g=gk_BTHK, initial_state=s0, output_final_state=keep, cu_seqlens=cu_seqlens)
        y = self.output(o_BTHV, x)
        return y, {"recurrent": s, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # Per-channel decay: the intra-chunk scores need q*exp(g) and k*exp(-g) (one extra C*K pass).
        return self.num_heads * rec.chunked_flops(seq_len, self.head_k_dim, self.head_v_dim, extra_ck=1)
