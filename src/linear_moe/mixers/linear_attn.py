"""Linear attention token mixer (no decay) with a choice of feature maps."""

from __future__ import annotations

from torch import nn

from linear_moe.layers.norm import RMSNorm
from linear_moe.mixers import _linear
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.feature_maps import build_feature_map

OUTPUT_NORMS = ("rmsnorm", "identity")


class LinearAttention(_linear.LinearMixer):
    """Linear attention: S_t = S_{t-1} + phi(k_t) v_t^T, o_t = S_t^T phi(q_t) / sqrt(K') (K' = phi's width; optionally divided by
    phi(q_t) . sum_s phi(k_s)), then per-head RMSNorm and o_proj. "Transformers are RNNs: Fast Autoregressive
    Transformers with Linear Attention", arXiv:2006.16236. Follows fla's `LinearAttention`.

    Options (fla defaults):
        expand_k (1.0), expand_v (1.0): key / value width = hidden_size * ratio, split over heads.
        num_kv_heads (None -> num_heads): grouped k/v heads.
        feature_map ('elementwise_product'): a name in feature_maps.FEATURE_MAPS (elu_p1, relu, hedgehog, t2r,
        dpfp, identity, ...); tie_feature_map_qk (False): one learnable map for q and k.
        norm_q, norm_k (False): divide phi(q) / phi(k) by their sum (+1e-4).
        do_feature_map_norm (False): the normalised form (running key sum in the state).
        output_norm ('rmsnorm' | 'identity'), norm_eps (1e-5).
        use_short_conv (False), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
    State: `recurrent` [B, H, K', V] (float32; K' = the feature map's out_dim), `normalizer` [B, 1, H, K'] with
    do_feature_map_norm, conv_q/k/v [B, C, W-1] with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        num_kv_heads: int | None = None,
        feature_map: str = "elementwise_product",
        tie_feature_map_qk: bool = False,
        norm_q: bool = False,
        norm_k: bool = False,
        do_feature_map_norm: bool = False,
        output_norm: str = "rmsnorm",
        norm_eps: float = 1e-5,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
    ):
        super().__init__()
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(f"LinearAttention: output_norm must be one of {OUTPUT_NORMS}, got {output_norm!r}")
        hk, hv, hkv = _linear.head_dims("LinearAttention", hidden_size, num_heads, expand_k, expand_v, num_kv_heads)
        self._init_qkv(hidden_size, num_heads, layer_idx, hk, hv, hkv, use_short_conv, conv_size, conv_bias)
        self.feature_map_q = build_feature_map(feature_map, hk, "LinearAttention")
        self.feature_map_k = self.feature_map_q if tie_feature_map_qk else build_feature_map(feature_map, hk)
        self.norm = RMSNorm(hv, eps=norm_eps) if output_norm == "rmsnorm" else nn.Identity()
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.norm_q, self.norm_k, self.normalize = norm_q, norm_k, do_feature_map_norm

    def state_spec(self) -> dict[str, StateSpec]:
        return self.linear_spec(self.feature_map_q.out_dim, self.normalize)

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q, k, v, conv_state = self.project_qkv(x, state, cu_seqlens, keep)
        k, v = self.repeat_kv(k, v)
        q, k = self.feature_map_q(q), self.feature_map_k(k)
        if self.norm_q:
            q = q / (q.sum(-1, keepdim=True) + 1e-4)
        if self.norm_k:
            k = k / (k.sum(-1, keepdim=True) + 1e-4)
        o_BTHV, s = self.run_linear_attn(q, k, v, state, keep, cu_seqlens, self.normalize, None)
        y = self.o_proj(self.norm(o_BTHV).flatten(-2))
        return y, {**s, **conv_state}

    def sequence_flops(self, seq_len: int) -> float:
        kf = self.feature_map_q.out_dim
        norm = 4 * kf if self.normalize else 0  # running key sum and q . z
        return self.num_heads * (rec.chunked_flops(seq_len, kf, self.head_v_dim) + norm)
