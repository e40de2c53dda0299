"""RWKV-6 (Finch) time mixing: data-dependent token shift and decay on a matrix-valued state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._linear import head_dims
from linear_moe.mixers.base import Mixer, MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.low_rank import LowRankProjection
from linear_moe.ops.token_shift import token_shift

GATE_FNS = {"swish": F.silu, "silu": F.silu, "sigmoid": torch.sigmoid, "relu": F.relu, "gelu": F.gelu}


class LerpLinear(nn.Module):
    """`linear(x + delta * mu)`: token-shift interpolation with a learned static mu [D] (fla name)."""

    def __init__(self, input_dim: int, output_dim: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim, bias=False)
        self.mu = nn.Parameter(torch.zeros(input_dim))

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.linear(x + delta * self.mu)


class DDLerpLinear(nn.Module):
    """`linear(x + delta * mu_t)` with a data-dependent mu_t [B, T, D]; `linear` is dense or a LoRA (fla name)."""

    def __init__(self, input_dim: int, output_dim: int, low_rank_dim: int | None = None):
        super().__init__()
        self.linear = (
            nn.Linear(input_dim, output_dim, bias=False)
            if low_rank_dim is None
            else LowRankProjection(input_dim, output_dim, low_rank_dim)
        )

    def forward(self, x: torch.Tensor, mu: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.linear(x + delta * mu)


class RWKV6Attention(Mixer):
    """RWKV-6 time mixing: S_t = diag(w_t) S_{t-1} + k_t v_t^T, o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),
    with data-dependent token-shift interpolation (ddlerp LoRAs) and decay w_t = exp(-exp(lora(x))).

    "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence", arXiv:2404.05892.
    Follows fla's `RWKV6Attention` (names x_proj, x_bias, r/w/k/v/g_proj, bonus, g_norm, o_proj).

    Options (fla defaults): expand_k (0.5), expand_v (1.0): key/value widths; gate_fn ('swish'): output gate
    activation, one of GATE_FNS; proj_low_rank_dim (32): rank of the five ddlerp LoRAs; gate_low_rank_dim (64):
    rank of the decay LoRA; elementwise_affine (True): affine per-head GroupNorm; norm_eps (1e-5).
    State: `recurrent` [B, H, K, V] (float32), `shift` [B, hidden_size] (the previous token).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_fn: str = "swish",
        proj_low_rank_dim: int = 32,
        gate_low_rank_dim: int = 64,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if gate_fn not in GATE_FNS:
            raise ValueError(f"RWKV6Attention: gate_fn must be one of {list(GATE_FNS)}, got {gate_fn!r}")
        hk, hv, _ = head_dims("RWKV6Attention", hidden_size, num_heads, expand_k, expand_v, None)
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.head_k_dim, self.head_v_dim = hk, hv
        self.key_dim, self.value_dim = num_heads * hk, num_heads * hv
        self.proj_low_rank_dim, self.gate_fn = proj_low_rank_dim, GATE_FNS[gate_fn]

        self.x_proj = nn.Sequential(
            LerpLinear(hidden_size, proj_low_rank_dim * 5),
            nn.Tanh(),
            nn.Linear(proj_low_rank_dim * 5, hidden_size, bias=False),  # used block-diagonally: one block per mu
        )
        self.x_bias = nn.Parameter(torch.zeros(5, hidden_size))
        self.r_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.w_proj = DDLerpLinear(hidden_size, self.key_dim, low_rank_dim=gate_low_rank_dim)
        self.k_proj = DDLerpLinear(hidden_size, self.key_dim)
        self.v_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.g_proj = DDLerpLinear(hidden_size, self.value_dim)
        self.bonus = nn.Parameter(torch.zeros(num_heads, self.head_k_dim))
        self.g_norm = nn.GroupNorm(num_heads, self.value_dim, eps=norm_eps, affine=elementwise_affine)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self._init_linears()

    @torch.no_grad()
    def _init_linears(self) -> None:
        # fla: dense projections xavier-uniform with gain 2^-2.5; LoRAs keep their own (zero / orthogonal) init.
        loras = {id(m) for lora in self.modules() if isinstance(lora, LowRankProjection) for m in lora.modules()}
        for m in self.modules():
            if isinstance(m, nn.Linear) and id(m) not in loras:
                nn.init.xavier_uniform_(m.weight, gain=2**-2.5)

    def state_spec(self) -> dict[str, StateSpec]:
        return {
            "recurrent": StateSpec((self.num_heads, self.head_k_dim, self.head_v_dim), kind="diagonal"),  # diag(w_t)
            "shift": StateSpec((self.hidden_size,), None, "window", 1),
        }

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        B, T, D = x.shape
        H = self.num_heads
        delta, shift_ND = token_shift(x, None if state is None else state["shift"], cu_seqlens)
        # ddlerp: five data-dependent interpolation weights mu_{r,w,k,v,g} [B, T, D], each from its own LoRA block
        lo_BT5R = self.x_proj[1](self.x_proj[0](x, delta)).unflatten(-1, (5, self.proj_low_rank_dim))
        up_D5R = self.x_proj[2].weight.unflatten(-1, (5, self.proj_low_rank_dim))
        mu_BT5D = torch.einsum("btnr,dnr->btnd", lo_BT5R, up_D5R) + self.x_bias
        mu_r, mu_w, mu_k, mu_v, mu_g = mu_BT5D.unbind(-2)
        r_BTHK = self.r_proj(x, mu_r, delta).unflatten(-1, (H, self.head_k_dim))
        w_BTHK = -rec.acc(self.w_proj(x, mu_w, delta)).exp().unflatten(-1, (H, self.head_k_dim))  # log decay
        k_BTHK = self.k_proj(x, mu_k, delta).unflatten(-1, (H, self.head_k_dim))
        v_BTHV = self.v_proj(x, mu_v, delta).unflatten(-1, (H, self.head_v_dim))
        g = self.g_proj(x, mu_g, delta)
        fn = rec.op("rwkv6", rec.use_recurrent_kernel(self, state, T))
        o_BTHV, s_BHKV = fn(
            r=r_BTHK,
            k=k_BTHK,
            v=v_BTHV,
            w=w_BTHK,
            u=self.bonus,
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        o = self.g_norm(o_BTHV.reshape(B * T, self.value_dim)).view(B, T, self.value_dim)
        y = self.o_proj(o * self.gate_fn(g))
        return y, {"recurrent": s_BHKV, "shift": shift_ND}

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked form with per-channel decay: r.k^T (C*K), scores.v (C*V), r.S (K*V), state update (K*V);
        # the decay rescaling of r/k within a chunk adds O(K) per token, ignored.
        return self.num_heads * rec.chunked_flops(seq_len, self.head_k_dim, self.head_v_dim)
