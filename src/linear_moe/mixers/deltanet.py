"""DeltaNet token mixer (delta rule linear attention, chunk-parallel form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._linear import head_dims
from linear_moe.mixers._parts import GatedOutput, Projections
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor

QK_ACTIVATIONS = ("silu", "relu", "elu", "identity")
QK_NORMS = ("l2", "sum")


def qk_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """DeltaNet's feature activation for q/k ('silu' is applied inside the short convolution)."""
    if name == "relu":
        return F.relu(x)
    if name == "elu":
        return F.elu(x) + 1.0
    return x


class DeltaNet(Projections, GatedOutput):
    """DeltaNet: S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(d_k).

    "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", arXiv:2406.06484
    (the delta rule from arXiv:2102.11174). Follows fla's `DeltaNet` layer.

    Options (fla defaults):
        expand_k, expand_v (1.0, 1.0): key/value width = hidden_size * expand.
        use_beta (True): beta_t = sigmoid(b_proj(x)), else 1.
        use_gate (False): output `rmsnorm(o) * silu(g_proj(x))` instead of `rmsnorm(o)`.
        use_short_conv (True), conv_size (4), conv_bias (False): causal depthwise conv on q, k, v.
        allow_neg_eigval (False): beta in (0, 2) (arXiv:2411.12537).
        qk_activation ('silu' | 'relu' | 'elu' | 'identity'), qk_norm ('l2' | 'sum'), norm_eps (1e-5).
    State: `recurrent` [B, H, K, V] (float32) and `conv_q`/`conv_k` [B, H*K, W-1], `conv_v` [B, H*V, W-1].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        use_beta: bool = True,
        use_gate: bool = False,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        qk_activation: str = "silu",
        qk_norm: str = "l2",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"DeltaNet: qk_activation must be one of {QK_ACTIVATIONS}, got {qk_activation!r}")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"DeltaNet: qk_norm must be one of {QK_NORMS}, got {qk_norm!r}")
        hk, hv, _ = head_dims("DeltaNet", hidden_size, num_heads, expand_k, expand_v, None)
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_k_dim, self.head_v_dim = hk, hv
        self.key_dim, self.value_dim = num_heads * hk, num_heads * hv
        self.use_beta, self.allow_neg_eigval = use_beta, allow_neg_eigval
        self.qk_activation, self.qk_norm = qk_activation, qk_norm
        qk_act = "silu" if qk_activation == "silu" else None
        dims = {"q": self.key_dim, "k": self.key_dim, "v": self.value_dim}
        self.add_projections(dims, use_short_conv, conv_size, conv_bias, {"q": qk_act, "k": qk_act, "v": "silu"})
        if use_beta:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.add_output(self.value_dim, hv, "swish" if use_gate else None, norm_eps)

    def state_spec(self) -> dict[str, StateSpec]:
        spec = {"recurrent": StateSpec((self.num_heads, self.head_k_dim, self.head_v_dim), kind="matrix")}
        return {**spec, **self.conv_spec()}

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        (q, k, v), new_state = self.project(x, state, cu_seqlens, keep)
        if not self.use_short_conv:  # the convolutions apply silu themselves
            if self.qk_activation == "silu":
                q, k = F.silu(q), F.silu(k)
            v = F.silu(v)
        q_BTHK = qk_activation(q.unflatten(-1, (-1, self.head_k_dim)), self.qk_activation)
        k_BTHK = qk_activation(k.unflatten(-1, (-1, self.head_k_dim)), self.qk_activation)
        v_BTHV = v.unflatten(-1, (-1, self.head_v_dim))
        if self.qk_norm == "sum":  # "l2" runs inside the op (in fla's kernel on GPU)
            q_BTHK, k_BTHK = F.normalize(q_BTHK, p=1, dim=-1, eps=1e-6), F.normalize(k_BTHK, p=1, dim=-1, eps=1e-6)
        beta_BTH = self.b_proj(x).sigmoid() if self.use_beta else x.new_ones(q_BTHK.shape[:3])
        if self.allow_neg_eigval:
            beta_BTH = beta_BTH * 2.0

        fn = rec.op("delta_rule", rec.use_recurrent_kernel(self, state, x.shape[1]))
        o_BTHV, s_BHKV = fn(
            q=q_BTHK,
            k=k_BTHK,
            v=v_BTHV,
            beta=beta_BTH,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=self.qk_norm == "l2",
        )
        return self.output(o_BTHV, x), {"recurrent": s_BHKV, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # WY form per chunk: beta K K^T (C*K), T = (I + A)^-1 (~C^2/3, ignored), W = T beta K (C*K),
        # U = T beta V (C*V), U - W S (K*V), plus the generic scores / reads / updates.
        return self.num_heads * rec.chunked_flops(
            seq_len, self.head_k_dim, self.head_v_dim, extra_ck=2, extra_cv=1, extra_kv=1
        )
