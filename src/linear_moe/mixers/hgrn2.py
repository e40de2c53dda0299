"""HGRN2 token mixer: HGRN with outer-product state expansion, run on the GLA ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.layers.norm import RMSNorm
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import Mixer, MixerState
from linear_moe.mixers.hgrn import bounded_log_forget


class HGRN2Attention(Mixer):
    """HGRN2: per head S_t = diag(lambda_t) S_{t-1} + (1 - lambda_t) i_t^T, o_t = S_t^T silu(q_t) / sqrt(d_f),
    i.e. gated linear attention with key 1 - lambda_t (the forget gate's complement) and lambda_t bounded
    below as in HGRN; output `o_proj(rmsnorm(o))`.

    "HGRN2: Gated Linear RNNs with State Expansion", arXiv:2404.07904. Follows fla's `HGRN2Attention`
    (names q_proj, f_proj, i_proj, q/f/i_conv1d, g_norm, o_proj; fla's default GLA scale d_f^-1/2).

    Options: expand_ratio (None -> hidden_size // num_heads, fla's 128 with its derived heads): forget (key)
    dim per head d_f; use_short_conv (False), conv_size (4), conv_bias (False): conv (no activation) on q, f, i;
    elementwise_affine (True); norm_eps (1e-5). Lower bound: `forward(..., lower_bound=gamma [H*d_f])` as in
    `HGRNAttention` (ignored in layer 0).
    State: `recurrent` [B, H, d_f, hidden_size // H] (float32), plus `conv_q`/`conv_f` [B, H*d_f, W-1] and
    `conv_i` [B, hidden_size, W-1] with short convs.
    """

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
        self.use_short_conv = use_short_conv
        self.q_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(self.forget_dim, conv_size, activation=None, bias=conv_bias)
            self.f_conv1d = ShortConvolution(self.forget_dim, conv_size, activation=None, bias=conv_bias)
            self.i_conv1d = ShortConvolution(hidden_size, conv_size, activation=None, bias=conv_bias)
        self.g_norm = RMSNorm(hidden_size, eps=norm_eps, elementwise_affine=elementwise_affine)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def state_keys(self) -> list[str]:
        return ["recurrent"] + (rec.conv_state_keys("qfi") if self.use_short_conv else [])

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
        lower_bound: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState | None]:
        rec.check_call(self, x, state, cu_seqlens, self.state_keys())
        keep = use_cache or state is not None
        T = x.shape[1]
        H = self.num_heads
        new_state: MixerState = {}
        q, f, i = self.q_proj(x), self.f_proj(x), self.i_proj(x)
        if self.use_short_conv:
            convs = {"q": self.q_conv1d, "f": self.f_conv1d, "i": self.i_conv1d}
            (q, f, i), new_state = rec.run_short_convs(convs, {"q": q, "f": f, "i": i}, state, cu_seqlens, keep)
        g = bounded_log_forget(f, lower_bound if self.layer_idx > 0 else None)
        q_BTHK = F.silu(q).unflatten(-1, (H, self.head_f_dim))
        k_BTHK = (-torch.expm1(g)).to(x.dtype).unflatten(-1, (H, self.head_f_dim))  # 1 - lambda
        g_BTHK = g.unflatten(-1, (H, self.head_f_dim))
        v_BTHV = i.unflatten(-1, (H, self.head_i_dim))

        recurrent = rec.use_recurrent_kernel(self, state, T)
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
        y = self.o_proj(self.g_norm(o_BTHV.flatten(-2)))
        return y, ({"recurrent": s_BHKV, **new_state} if keep else None)

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked GLA with per-key decay: q.k^T (C*d_f), scores.i (C*d_i), q.S and the state update (d_f*d_i).
        return self.num_heads * rec.chunked_flops(seq_len, self.head_f_dim, self.head_i_dim)
