"""ReBased token mixer: Based with a learnable quadratic kernel."""

from __future__ import annotations

from torch import nn

from linear_moe.mixers.based import BasedLinearAttention
from linear_moe.mixers.feature_maps import RebasedFeatureMap


class ReBasedLinearAttention(BasedLinearAttention):
    """ReBased: normalised linear attention with phi(q).phi(k) = (q'.k')^2 / d, q' = layernorm(q) * gamma + beta
    (learnable per head channel), then o_proj. "Linear Transformers with Learnable Kernel Functions are Better
    In-Context Models", arXiv:2402.10644. Follows fla's `ReBasedLinearAttention` (chunk mode:
    `chunk_linear_attn(normalize=True, scale=1)`; fla's parallel kernel adds eps=1e-5 to the denominator, the
    chunk kernels 1e-10 as here).

    Options (fla defaults): feature_dim (16; state key dim d(d+1)/2 = 136), use_gamma (True), use_beta (True),
    normalize (True: layernorm before the affine map), use_short_conv (False), conv_size (4), conv_bias (False).
    State: as Based: `recurrent` [B, H, K', V], `normalizer` [B, 1, H, K'], conv_q/k/v with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        feature_dim: int = 16,
        use_gamma: bool = True,
        use_beta: bool = True,
        normalize: bool = True,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
    ):
        self._map_opts = dict(use_gamma=use_gamma, use_beta=use_beta, normalize=normalize)
        super().__init__(hidden_size, num_heads, layer_idx, feature_dim, use_short_conv, conv_size, conv_bias)

    def build_feature_map(self, feature_dim: int) -> nn.Module:
        return RebasedFeatureMap(feature_dim, **self._map_opts)
