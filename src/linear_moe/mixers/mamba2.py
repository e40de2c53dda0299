"""Mamba2 token mixer: the SSD recurrence run on the simple-GLA (scalar-decay linear attention) ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import Mixer, MixerContext, MixerState, StateSpec, Tensor


class GroupedGatedRMSNorm(nn.Module):
    """Mamba2's gated RMSNorm over groups of `group_size` channels (weight [dim]):
    `norm(y * silu(z)) * w` (norm_before_gate=False, the default) or `norm(y) * w * silu(z)`."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gate = F.silu(rec.acc(z))
        h = rec.acc(y) if self.norm_before_gate else rec.acc(y) * gate
        h = F.rms_norm(h.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps).flatten(-2)
        h = h * self.weight.to(h.dtype)
        return (h * gate if self.norm_before_gate else h).to(y.dtype)


class Mamba2(Mixer):
    """Mamba2 (SSD): h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t, per head with scalar A.

    "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
    Duality", arXiv:2405.21060. Follows fla's `Mamba2` layer (names in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj) without the mamba-ssm dependency: the scan is `simple_gla` with q = C, k = B, v = x*dt,
    g = -exp(A_log) * dt, scale 1, so the chunked and recurrent forms come from the ops package.

    Options (fla defaults): expand (2): inner width I = expand * hidden_size, head_dim = I // num_heads;
    state_size (128): N; n_groups (1): B/C groups shared by num_heads // n_groups consecutive heads;
    conv_kernel (4), use_conv_bias (True): short conv (silu) over [x, B, C]; A_init_range ((1, 16));
    D_has_hdim (False): D per channel instead of per head; rmsnorm (True): grouped gated RMSNorm with z, else
    y * silu(z); norm_before_gate (False); dt_min (1e-3), dt_max (0.1), dt_init_floor (1e-4): dt_bias init;
    dt_limit ((0, inf)): clamp of dt; use_bias (False): bias in in_proj/out_proj; norm_eps (1e-5).
    State: `recurrent` [B, H, N, head_dim] (float32; note: mamba-ssm stores [B, H, head_dim, N]),
    `conv_xbc` [B, I + 2*n_groups*N, W-1].
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand: int = 2,
        state_size: int = 128,
        n_groups: int = 1,
        conv_kernel: int = 4,
        use_conv_bias: bool = True,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        use_bias: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        inner = int(expand * hidden_size)
        if inner % num_heads:
            raise ValueError(f"Mamba2: expand*hidden_size={inner} must be divisible by num_heads={num_heads}")
        if n_groups <= 0 or num_heads % n_groups:
            raise ValueError(f"Mamba2: n_groups={n_groups} must divide num_heads={num_heads}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2: A_init_range must be (low, high) with 0 < low <= high, got {A_init_range}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.intermediate_size, self.head_dim = inner, inner // num_heads
        self.ssm_state_size, self.n_groups, self.dt_limit = state_size, n_groups, tuple(dt_limit)
        self.rmsnorm, self.D_has_hdim = rmsnorm, D_has_hdim
        self.conv_dim = inner + 2 * n_groups * state_size

        self.in_proj = nn.Linear(hidden_size, inner + self.conv_dim + num_heads, bias=use_bias)  # [z, xBC, dt]
        self.conv1d = ShortConvolution(self.conv_dim, conv_kernel, activation="silu", bias=use_conv_bias)
        self.dt_bias = nn.Parameter(rec.init_dt_bias(num_heads, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(inner if D_has_hdim else num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = GroupedGatedRMSNorm(inner, inner // n_groups, norm_eps, norm_before_gate)
        self.out_proj = nn.Linear(inner, hidden_size, bias=use_bias)

    def state_spec(self) -> dict[str, StateSpec]:
        w = self.conv1d.kernel_size
        return {
            "recurrent": StateSpec((self.num_heads, self.ssm_state_size, self.head_dim), kind="diagonal"),  # exp(dt A)
            "conv_xbc": StateSpec((self.conv_dim, w - 1), None, "window", w - 1),
        }

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        T = x.shape[1]
        H, P, N, G = self.num_heads, self.head_dim, self.ssm_state_size, self.n_groups
        z, xbc, dt_BTH = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        conv_state = None if state is None else state["conv_xbc"]
        xbc, conv_xbc = self.conv1d(xbc, conv_state, cu_seqlens, output_final_state=keep)
        xs, b, c = xbc.split([self.intermediate_size, G * N, G * N], dim=-1)
        x_BTHP = xs.unflatten(-1, (H, P))
        b_BTHN = b.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)  # head h reads group h // (H/G)
        c_BTHN = c.unflatten(-1, (G, N)).repeat_interleave(H // G, dim=2)
        dt_BTH = F.softplus(rec.acc(dt_BTH) + rec.acc(self.dt_bias)).clamp(*self.dt_limit)
        g_BTH = -rec.acc(self.A_log).exp() * dt_BTH

        fn = rec.op("simple_gla", rec.use_recurrent_kernel(self, state, T))
        o_BTHP, s_BHNP = fn(
            q=c_BTHN,
            k=b_BTHN,
            v=(rec.acc(x_BTHP) * dt_BTH[..., None]).to(x.dtype),
            g=g_BTH,
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        D = self.D.view(H, P) if self.D_has_hdim else self.D[:, None]
        y = (rec.acc(o_BTHP) + rec.acc(x_BTHP) * rec.acc(D)).flatten(-2).to(x.dtype)
        y = self.norm(y, z) if self.rmsnorm else y * F.silu(z)
        return self.out_proj(y), {"recurrent": s_BHNP, "conv_xbc": conv_xbc}

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked SSD: C.B^T (C*N), masked scores.(x dt) (C*P), C.h (N*P), state update B^T.(x dt) (N*P).
        return self.num_heads * rec.chunked_flops(seq_len, self.ssm_state_size, self.head_dim)
