"""Mamba2 token mixer: the SSD recurrence run on the simple-GLA (scalar-decay linear attention) ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._parts import Projections
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor

# fla's / mamba-ssm's / transformers' fused layout: in_proj rows [z, x, B, C, dt], conv1d channels [x, B, C]
IN_PROJ = ("z_proj", "x_proj", "b_proj", "c_proj", "dt_proj")
CONV1D = ("x_conv1d", "b_conv1d", "c_conv1d")


class GroupedGatedRMSNorm(nn.Module):
    """Mamba2's RMSNorm over groups of `group_size` channels (weight [dim]): `norm(x) * w`, or with a gate g
    `norm(x) * w * silu(g)` (GatedRMSNorm's form). Mamba2's default norm_before_gate=False normalises y * silu(z):
    the caller gates first."""

    activation = "swish"

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        h = rec.acc(x)
        h = F.rms_norm(h.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps).flatten(-2)
        h = h * self.weight.to(h.dtype)
        return (h if g is None else h * F.silu(rec.acc(g))).to(x.dtype)


class Mamba2(Projections):
    """Mamba2 (SSD): h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t, per head with scalar A.

    "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space
    Duality", arXiv:2405.21060. Follows fla's `Mamba2` layer without the mamba-ssm dependency: the scan is
    `simple_gla` with q = C, k = B, v = x*dt, g = -exp(A_log) * dt, scale 1, so the chunked and recurrent forms come
    from the ops package. fla's fused `in_proj` ([z, x, B, C, dt] rows) and `conv1d` ([x, B, C] channels) are
    separate weights here: z_proj, x_proj, b_proj, c_proj, dt_proj and depthwise x_conv1d, b_conv1d, c_conv1d (the
    same function: a depthwise convolution splits by channel exactly), so tensor parallelism splits each with the
    heads or the B/C groups as a plain weight. `fused_state_dict` / `split_state_dict` convert to and from the
    fused layout (fla, mamba-ssm, transformers). Other names as fla: dt_bias, A_log, D, norm, out_proj.

    Options (fla defaults): expand (2): inner width I = expand * hidden_size, head_dim = I // num_heads;
    state_size (128): N; n_groups (1): B/C groups shared by num_heads // n_groups consecutive heads;
    conv_kernel (4), use_conv_bias (True): short conv (silu) over x, B and C; A_init_range ((1, 16));
    D_has_hdim (False): D per channel instead of per head; rmsnorm (True): grouped gated RMSNorm with z, else
    y * silu(z); norm_before_gate (False); dt_min (1e-3), dt_max (0.1), dt_init_floor (1e-4): dt_bias init;
    dt_limit ((0, inf)): clamp of dt; use_bias (False): bias in the input projections and out_proj; norm_eps (1e-5).
    State: `recurrent` [B, H, N, head_dim] (float32; note: mamba-ssm stores [B, H, head_dim, N]),
    `conv_x` [B, I, W-1], `conv_b`, `conv_c` [B, n_groups*N, W-1].
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
        if conv_kernel < 2:
            raise ValueError(f"Mamba2: conv_kernel must be >= 2, got {conv_kernel}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.intermediate_size, self.head_dim = inner, inner // num_heads
        self.ssm_state_size, self.n_groups, self.dt_limit = state_size, n_groups, tuple(dt_limit)
        self.heads_per_group = num_heads // n_groups  # of the whole layer: tensor parallelism leaves it
        self.rmsnorm, self.norm_before_gate, self.D_has_hdim = rmsnorm, norm_before_gate, D_has_hdim

        self.z_proj = nn.Linear(hidden_size, inner, bias=use_bias)
        bc = n_groups * state_size
        self.add_projections({"x": inner, "b": bc, "c": bc}, True, conv_kernel, use_conv_bias, "silu", use_bias)
        self.dt_proj = nn.Linear(hidden_size, num_heads, bias=use_bias)
        self.dt_bias = nn.Parameter(rec.init_dt_bias(num_heads, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(inner if D_has_hdim else num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        if rmsnorm:
            self.norm = GroupedGatedRMSNorm(inner, inner // n_groups, norm_eps)
            self.out_norm_name, self.out_norm_dim = "norm", inner // n_groups
        self.out_proj = nn.Linear(inner, hidden_size, bias=use_bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict in the fused layout (checkpoints and Hugging Face exports written before the projections
        # were split, fla's / mamba-ssm's weights) loads as if converted by `split_state_dict` first
        if f"{prefix}in_proj.weight" in state_dict:
            split = split_state_dict({k: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix)
            for k in [k for k in state_dict if k.startswith(prefix)]:
                del state_dict[k]
            state_dict.update(split)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def state_spec(self) -> dict[str, StateSpec]:
        spec = {"recurrent": StateSpec((self.num_heads, self.ssm_state_size, self.head_dim), kind="diagonal")}
        return {**spec, **self.conv_spec()}  # "recurrent" decays by exp(dt A)

    def head_groups(self, device: torch.device) -> Tensor:
        """[H] the B/C group each head of this module reads, indexing its `n_groups` groups: head h of the layer reads
        group h // heads_per_group (mamba-ssm's layout). Under tensor parallelism this module runs heads from
        `head_offset` on and holds either every group (shared B/C) or G/tp consecutive ones, starting at a multiple
        of G/tp: the group modulo n_groups is its place in both cases."""
        h = self.head_offset + torch.arange(self.num_heads, device=device)
        return h // self.heads_per_group % self.n_groups

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        T = x.shape[1]
        H, P, N = self.num_heads, self.head_dim, self.ssm_state_size
        (xs, b, c), new_state = self.project(x, state, cu_seqlens, keep)
        x_BTHP = xs.unflatten(-1, (H, P))
        groups_H = self.head_groups(x.device)
        b_BTHN = b.unflatten(-1, (-1, N)).index_select(2, groups_H)
        c_BTHN = c.unflatten(-1, (-1, N)).index_select(2, groups_H)
        dt_BTH = F.softplus(rec.acc(self.dt_proj(x)) + rec.acc(self.dt_bias)).clamp(*self.dt_limit)
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
        z = self.z_proj(x)
        if not self.rmsnorm:
            y = y * F.silu(z)
        elif self.norm_before_gate:
            y = self.norm(y, z)
        else:  # norm(y * silu(z)), the product kept in the accumulation dtype
            y = self.norm(rec.acc(y) * F.silu(rec.acc(z))).to(x.dtype)
        return self.out_proj(y), {"recurrent": s_BHNP, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked SSD: C.B^T (C*N), masked scores.(x dt) (C*P), C.h (N*P), state update B^T.(x dt) (N*P).
        return self.num_heads * rec.chunked_flops(seq_len, self.ssm_state_size, self.head_dim)


def fused_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """`state` with the Mamba2 weights under `prefix` (e.g. "layers.0.mixer.") in the fused layout of fla's,
    mamba-ssm's and transformers' Mamba2: `in_proj` = z, x, B, C, dt projections stacked on rows, `conv1d` = the
    x, B, C convolutions stacked on channels, weight [C, 1, W] (nn.Conv1d's); other entries unchanged."""
    out = dict(state)
    for fused, parts in (("in_proj", IN_PROJ), ("conv1d", CONV1D)):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{p}.{kind}" for p in parts]
            if keys[0] not in out:  # a bias that is off
                continue
            t = torch.cat([out.pop(k) for k in keys])
            out[f"{prefix}{fused}.{kind}"] = t.unsqueeze(1) if (fused, kind) == ("conv1d", "weight") else t
    return out


def split_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The inverse of `fused_state_dict`: fused `in_proj` / `conv1d` entries under `prefix` (conv weight [C, 1, W]
    or [C, W]) -> our separate projections and convolutions. The sizes come from the shapes: H from A_log, I + 2GN
    from conv1d's channels, I from in_proj's rows (2I + 2GN + H)."""
    out = dict(state)
    H, C = out[f"{prefix}A_log"].shape[0], out[f"{prefix}conv1d.weight"].shape[0]
    inner = out[f"{prefix}in_proj.weight"].shape[0] - C - H
    bc = (C - inner) // 2
    for fused, parts, sizes in (("in_proj", IN_PROJ, [inner, inner, bc, bc, H]), ("conv1d", CONV1D, [inner, bc, bc])):
        for kind in ("weight", "bias"):
            t = out.pop(f"{prefix}{fused}.{kind}", None)
            if t is None:
                continue
            if fused == "conv1d" and kind == "weight":
                t = t.reshape(C, -1)
            out.update({f"{prefix}{p}.{kind}": piece for p, piece in zip(parts, t.split(sizes), strict=True)})
    return out
