"""Based token mixer: linear attention with a second-order Taylor feature map."""

from __future__ import annotations

from torch import nn

from linear_moe.mixers import _linear
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.feature_maps import TaylorFeatureMap


class BasedLinearAttention(_linear.LinearMixer):
    """Based: normalised linear attention o_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s) with the
    Taylor map phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d) ~ exp(q.k/sqrt(d)) on small feature_dim-wide q, k
    heads, then o_proj. "Simple linear attention language models balance the recall-throughput tradeoff",
    arXiv:2402.18668. Follows fla's `BasedLinearAttention` (its chunk mode: `chunk_linear_attn(normalize=True,
    scale=1)` on the mapped q, k).

    Options (fla defaults):
        feature_dim (16): q/k width per head before the map (state key dim 1 + d + d(d+1)/2 = 153).
        use_short_conv (False), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
    Value heads are hidden_size // num_heads wide. State: `recurrent` [B, H, K', V] (float32), `normalizer`
    [B, 1, H, K'] (running sum of phi(k)), conv_q/k/v [B, C, W-1] with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        feature_dim: int = 16,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
    ):
        super().__init__()
        name = type(self).__name__
        if feature_dim <= 0:
            raise ValueError(f"{name}: feature_dim must be positive, got {feature_dim}")
        if hidden_size % num_heads:
            raise ValueError(f"{name}: num_heads={num_heads} must divide hidden_size={hidden_size}")
        self._init_qkv(
            hidden_size,
            num_heads,
            layer_idx,
            feature_dim,
            hidden_size // num_heads,
            num_heads,
            use_short_conv,
            conv_size,
            conv_bias,
        )
        self.feature_dim = feature_dim
        self.feature_map = self.build_feature_map(feature_dim)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def build_feature_map(self, feature_dim: int) -> nn.Module:
        return TaylorFeatureMap(feature_dim)

    def state_spec(self) -> dict[str, StateSpec]:
        return self.linear_spec(self.feature_map.out_dim, True)

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q, k, v, conv_state = self.project_qkv(x, state, cu_seqlens, keep)
        q, k = self.feature_map(q), self.feature_map(k)
        o_BTHV, s = self.run_linear_attn(q, k, v, state, keep, cu_seqlens, normalize=True, scale=1.0)
        y = self.o_proj(o_BTHV.flatten(-2))
        return y, {**s, **conv_state}

    def sequence_flops(self, seq_len: int) -> float:
        kf = self.feature_map.out_dim
        return self.num_heads * (rec.chunked_flops(seq_len, kf, self.head_v_dim) + 4 * kf)
