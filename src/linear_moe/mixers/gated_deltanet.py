"""Gated DeltaNet token mixer (gated delta rule, chunk-parallel form)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._parts import GatedOutput, Projections
from linear_moe.mixers.base import FLA_CP_MAX_HEAD_DIM, MixerContext, MixerState, StateSpec, Tensor

GATE_ACTIVATIONS = {"swish": "swish", "silu": "swish", "sigmoid": "sigmoid"}


def decay_log(a_BTH: torch.Tensor, A_log_H: torch.Tensor, dt_bias_H: torch.Tensor) -> torch.Tensor:
    """Mamba2-style per-head log decay g = -exp(A_log) * softplus(a + dt_bias), float32 [B, T, H]."""
    return -rec.acc(A_log_H).exp() * F.softplus(rec.acc(a_BTH) + rec.acc(dt_bias_H))


class GatedDeltaNet(Projections, GatedOutput):
    """Gated DeltaNet: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T, o_t = S_t^T q_t / sqrt(d_k),
    with alpha_t = exp(-exp(A_log) softplus(a_proj(x) + dt_bias)).

    "Gated Delta Networks: Improving Mamba2 with Delta Rule", arXiv:2412.06464. Follows fla's `GatedDeltaNet`.

    Options (fla defaults unless noted):
        head_dim (None -> hidden_size // num_heads; fla's 256 assumes its own head count): key dim per head.
        expand_v (2.0): value dim per head = head_dim * expand_v.
        use_gate (True): output `rmsnorm(o) * act(g_proj(x))`; output_gate_activation ('swish'|'silu'|'sigmoid').
        use_short_conv (True), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
        allow_neg_eigval (False): beta in (0, 2) (arXiv:2411.12537). norm_eps (1e-5).
        num_v_heads (None -> num_heads): grouped value attention (GVA, as fla and Qwen3-Next): HV >= H value heads,
        HV a multiple of H, each group of HV/H consecutive value heads reading one q/k head; the gates (a, b, A_log,
        dt_bias) are per value head.
    State: `recurrent` [B, HV, K, V] (float32), `conv_q`/`conv_k` [B, H*K, W-1], `conv_v` [B, HV*V, W-1].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        output_gate_activation: str = "swish",
        num_v_heads: int | None = None,
    ):
        super().__init__()
        if output_gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(
                f"GatedDeltaNet: output_gate_activation must be one of {list(GATE_ACTIVATIONS)}, "
                f"got {output_gate_activation!r}"
            )
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        head_v_dim = head_dim * expand_v
        if head_dim <= 0 or not math.isclose(head_v_dim, round(head_v_dim)) or round(head_v_dim) <= 0:
            raise ValueError(f"GatedDeltaNet: head_dim={head_dim} * expand_v={expand_v} must be a positive integer")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads < num_heads or num_v_heads % num_heads:
            raise ValueError(f"GatedDeltaNet: num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.num_v_heads = num_v_heads
        self.head_k_dim, self.head_v_dim = head_dim, round(head_v_dim)
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, num_v_heads * self.head_v_dim
        self.allow_neg_eigval = allow_neg_eigval
        dims = {"q": self.key_dim, "k": self.key_dim, "v": self.value_dim}
        self.add_projections(dims, use_short_conv, conv_size, conv_bias)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_v_heads).uniform_(0, 16).log())
        self.A_log._no_weight_decay = True
        self.dt_bias = nn.Parameter(rec.init_dt_bias(num_v_heads))
        self.dt_bias._no_weight_decay = True
        gate = GATE_ACTIVATIONS[output_gate_activation] if use_gate else None
        self.add_output(self.value_dim, self.head_v_dim, gate, norm_eps)

    def state_spec(self) -> dict[str, StateSpec]:
        spec = {"recurrent": StateSpec((self.num_v_heads, self.head_k_dim, self.head_v_dim), kind="matrix")}
        return {**spec, **self.conv_spec()}

    def fla_cp_ops(self) -> tuple[str, ...]:
        if self.head_k_dim > FLA_CP_MAX_HEAD_DIM:
            return ()
        return ("chunk_gated_delta_rule", *(("causal_conv1d",) if self.use_short_conv else ()))

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        cp_context = None if ctx is None else ctx.cp_context
        (q, k, v), new_state = self.project(x, state, cu_seqlens, keep, cp_context)
        if not self.use_short_conv:  # the convolutions apply silu themselves
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        # q, k are l2-normalised inside the op (fla's kernel does it in registers: no fp32 copies under autocast)
        q_BTHK = q.unflatten(-1, (-1, self.head_k_dim))
        k_BTHK = k.unflatten(-1, (-1, self.head_k_dim))
        v_BTHV = v.unflatten(-1, (-1, self.head_v_dim))  # HV >= H heads (GVA)
        beta_BTH = self.b_proj(x).sigmoid()
        if self.allow_neg_eigval:
            beta_BTH = beta_BTH * 2.0
        g_BTH = decay_log(self.a_proj(x), self.A_log, self.dt_bias)

        fn = rec.op("gated_delta_rule", rec.use_recurrent_kernel(self, state, x.shape[1]))
        o_BTHV, s_BHKV = fn(
            q=q_BTHK,
            k=k_BTHK,
            v=v_BTHV,
            g=g_BTH,
            beta=beta_BTH,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
            cp_context=cp_context,
        )
        return self.output(o_BTHV, x), {"recurrent": s_BHKV, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # Same WY chunk form as DeltaNet; the scalar decay adds only O(C) per token.
        return self.num_v_heads * rec.chunked_flops(
            seq_len, self.head_k_dim, self.head_v_dim, extra_ck=2, extra_cv=1, extra_kv=1
        )
