"""HGRN token mixer: gated linear RNN with an element-wise (vector) state and a forget-gate lower bound."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.layers.norm import GatedRMSNorm
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import Mixer, MixerState


def layer_lower_bounds(logits_LD: torch.Tensor) -> torch.Tensor:
    """HGRN's per-layer forget-gate lower bounds from learned logits [L, D]: cumsum(softmax over layers)
    shifted so that layer 0 gets 0 and bounds increase with depth (arXiv:2311.04823, Sec. 3.2). -> [L, D]."""
    p_LD = rec.acc(logits_LD).softmax(0)
    return p_LD.cumsum(0) - p_LD[0]


def bounded_log_forget(f_raw: torch.Tensor, lower_bound: torch.Tensor | None) -> torch.Tensor:
    """log of the forget gate lambda = gamma + (1 - gamma) sigmoid(f_raw) (gamma = lower bound, 0 if None)."""
    f = F.logsigmoid(rec.acc(f_raw))
    if lower_bound is None:
        return f
    gamma = lower_bound.to(f.dtype)
    return torch.logaddexp(gamma.log(), torch.log1p(-gamma) + f)


class HGRNAttention(Mixer):
    """HGRN: h_t = lambda_t * h_{t-1} + (1 - lambda_t) * silu(i_t), o_t = rmsnorm(h_t) * silu(g_t), element-wise,
    with forget gate lambda_t = gamma + (1 - gamma) sigmoid(f_t) bounded below by the layer's gamma.

    "Hierarchically Gated Recurrent Neural Network for Sequence Modeling", arXiv:2311.04823.
    Follows fla's `HGRNAttention` (names i_proj, f_proj, g_proj, i_conv1d, f_conv1d, g_norm, o_proj).

    Options (fla defaults): expand_ratio (1): state width I = hidden_size * expand_ratio; use_short_conv (False),
    conv_size (4), conv_bias (False): conv (no activation) on i and f; elementwise_affine (True); norm_eps (1e-5).
    `num_heads` is accepted for the common interface; HGRN is element-wise and does not use it.
    The lower bound gamma [I] is passed to `forward(..., lower_bound=...)` by the model (see
    `layer_lower_bounds`); layer 0 ignores it (its bound is 0), and None means no bound.
    State: `recurrent` [B, I] (float32), plus `conv_i`/`conv_f` [B, I, W-1] with short convs.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int = 1,
        layer_idx: int = 0,
        expand_ratio: int = 1,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if expand_ratio < 1 or int(expand_ratio) != expand_ratio:
            raise ValueError(f"HGRNAttention: expand_ratio must be a positive integer, got {expand_ratio!r}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.input_dim = hidden_size * int(expand_ratio)
        self.use_short_conv = use_short_conv
        self.i_proj = nn.Linear(hidden_size, self.input_dim, bias=False)
        self.f_proj = nn.Linear(hidden_size, self.input_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, self.input_dim, bias=False)
        if use_short_conv:
            self.f_conv1d = ShortConvolution(self.input_dim, conv_size, activation=None, bias=conv_bias)
            self.i_conv1d = ShortConvolution(self.input_dim, conv_size, activation=None, bias=conv_bias)
        self.g_norm = GatedRMSNorm(self.input_dim, eps=norm_eps)
        if not elementwise_affine:
            self.g_norm.weight = None
        self.o_proj = nn.Linear(self.input_dim, hidden_size, bias=False)

    def state_keys(self) -> list[str]:
        return ["recurrent"] + (rec.conv_state_keys("if") if self.use_short_conv else [])

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
        new_state: MixerState = {}
        i, f = self.i_proj(x), self.f_proj(x)
        if self.use_short_conv:
            convs = {"i": self.i_conv1d, "f": self.f_conv1d}
            (i, f), new_state = rec.run_short_convs(convs, {"i": i, "f": f}, state, cu_seqlens, keep)
        log_f_BTI = bounded_log_forget(f, lower_bound if self.layer_idx > 0 else None)
        i_BTI = F.silu(rec.acc(i)) * -torch.expm1(log_f_BTI)  # (1 - lambda) silu(i), float32: fla's state dtype

        fn = rec.op("hgrn", rec.use_recurrent_kernel(self, state, T))
        o_BTI, h_BI = fn(
            x=i_BTI,
            g=log_f_BTI,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        y = self.o_proj(self.g_norm(o_BTI.to(x.dtype), self.g_proj(x)))
        return y, ({"recurrent": h_BI, **new_state} if keep else None)

    def sequence_flops(self, seq_len: int) -> float:
        # Element-wise scan: h = lambda h + x and the input gating, a few FLOPs per channel per token.
        return 4.0 * self.input_dim
