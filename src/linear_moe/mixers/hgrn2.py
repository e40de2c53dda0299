"""HGRN2 token mixer: HGRN with outer-product state expansion, run on the GLA ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._parts import GatedOutput, Projections
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.hgrn import add_lower_bound, bounded_log_forget


class HGRN2Attention(Projections, GatedOutput):
    """HGRN2: per head S_t = diag(lambda_t) S_{t-1} + (1 - lambda_t) i_t^T, o_t = S_t^T silu(q_t) / sqrt(d_f),
    i.e. gated linear attention with key 1 - lambda_t (the forget gate's complement) and lambda_t bounded
    below as in HGRN; output `o_proj(rmsnorm(o))`.

    "HGRN2: Gated Linear RNNs with State Expansion", arXiv:2404.07904. Follows fla's `HGRN2Attention`
    (names q_proj, f_proj, i_proj, q/f/i_conv1d, g_norm, o_proj; fla's default GLA scale d_f^-1/2).

    Options: expand_ratio (None -> hidden_size // num_heads, fla's 128 with its derived heads): forget (key)
    dim per head d_f; use_short_conv (False), conv_size (4), conv_bias (False): conv (no activation) on q, f, i;
    elementwise_affine (True); norm_eps (1e-5). num_layers (None -> layer_idx + 1): the
    forget-gate floor `lower_bound_logit` [H*d_f] is the layer's own, as in `HGRNAttention`.
    State: `recurrent` [B, H, d_f, hidden_size // H] (float32), plus `conv_q`/`conv_f` [B, H*d_f, W-1] and
    `conv_i` [B, hidden_size, W-1] with short convs.
    """

    uses_num_layers = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_ratio: int | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        num_layers: int | None = None,
    ):
        super().__init__()
        expand_ratio = hidden_size // num_heads if expand_ratio is None else expand_ratio
        if expand_ratio < 1 or hidden_size % num_heads:
            raise ValueError(
                f"HGRN2Attention: expand_ratio={expand_ratio} must be >= 1 and num_heads={num_heads} "
                f"must divide hidden_size={hidden_size}"
            )
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_f_dim, self.head_i_dim = expand_ratio, hidden_size // num_heads
        self.forget_dim = num_heads * expand_ratio
        dims = {"q": self.forget_dim, "f": self.forget_dim, "i": hidden_size}
        self.add_projections(dims, use_short_conv, conv_size, conv_bias, conv_activation=None)
        self.add_output(hidden_size, hidden_size, None, norm_eps, "g_norm", elementwise_affine)
        add_lower_bound(self, self.forget_dim, num_layers)

    def state_spec(self) -> dict[str, StateSpec]:
        spec = {"recurrent": StateSpec((self.num_heads, self.head_f_dim, self.head_i_dim), kind="diagonal")}  # lambda_t
        return {**spec, **self.conv_spec()}

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        (q, f, i), new_state = self.project(x, state, cu_seqlens, keep)
        g = bounded_log_forget(f, self.lower_bound_logit)
        q_BTHK = F.silu(q).unflatten(-1, (-1, self.head_f_dim))
        k_BTHK = (-torch.expm1(g)).to(x.dtype).unflatten(-1, (-1, self.head_f_dim))  # 1 - lambda
        g_BTHK = g.unflatten(-1, (-1, self.head_f_dim))
        v_BTHV = i.unflatten(-1, (-1, self.head_i_dim))
        recurrent = rec.use_recurrent_kernel(self, state, x.shape[1])
        gate = {"gk": g_BTHK} if recurrent else {"g": g_BTHK}  # fla names the key-wise gate differently
        o_BTHV, s_BHKV = rec.op("gla", recurrent)(
            q=q_BTHK,
            k=k_BTHK,
            v=v_BTHV,
            **gate,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        return self.output(o_BTHV, x), {"recurrent": s_BHKV, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked GLA with per-key decay: q.k^T (C*d_f), scores.i (C*d_i), q.S and the state update (d_f*d_i).
        return self.num_heads * rec.chunked_flops(seq_len, self.head_f_dim, self.head_i_dim)
