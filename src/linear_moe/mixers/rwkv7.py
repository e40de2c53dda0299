"""RWKV-7 (Goose) time mixing: generalized delta rule with vector-valued decay and in-context learning rate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import FLA_CP_MAX_HEAD_DIM, Mixer, MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.low_rank import LowRankProjection
from linear_moe.ops.token_shift import token_shift

LOG_DECAY_MIN = -math.exp(-0.5)  # w_t = exp(-e^-0.5 sigmoid(.)) in (0.545, 1): log decay in (-0.6065, 0)


def _lora_rank(scale: float, hidden_size: int, factor: float = 1.0) -> int:
    """fla's default LoRA rank: scale * sqrt(hidden) * factor rounded to a multiple of 32, at least 32."""
    return max(32, int(round(scale * hidden_size**0.5 * factor / 32) * 32))


class RWKV7Attention(Mixer):
    """RWKV-7 time mixing, per head with S as [V, K]: S_t = S_{t-1} (diag(w_t) - kk_t^T (a_t * kk_t)) + v_t^T k_t,
    o_t = S_t r_t (the state is stored transposed, [K, V]); static token-shift lerps, LoRA decay w, in-context
    rate a, gate g, the normalised removal key kk, and the bonus (r.(r_k * k)) v added after the group norm.

    "RWKV-7 "Goose" with Expressive Dynamic State Evolution", arXiv:2503.14456. Follows fla's
    `RWKV7Attention` (names x_r/x_w/x_k/x_v/x_a/x_g, k_k, k_a, r_k, r/k/v/o_proj, w/a/g_lora, g_norm) and its
    layer-dependent init. Value residual: layer 0 publishes its v as `context.v_first` (the forward's
    `MixerContext`); later layers use lerp(v, v_first, sigmoid(v_lora(xv))). Without a context (a mixer used alone)
    or without a published v_first (no RWKV-7 layer 0 in a hybrid stack) a layer uses its own v. `value_residual=False` turns it off.

    Options (fla defaults): value_dim (None -> hidden_size); decay_low_rank_dim, a_low_rank_dim,
    gate_low_rank_dim (None -> fla's sqrt(hidden)-based ranks); elementwise_affine (True): affine GroupNorm;
    norm_eps (1e-5, multiplied by head_dim as in fla); num_layers (None -> max(layer_idx + 1, 2)):
    depth used by the layer-dependent init. head_dim = hidden_size // num_heads.
    State: `recurrent` [B, H, K, V] (float32), `shift` [B, hidden_size] (the previous token).
    """

    uses_num_layers = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        value_dim: int | None = None,
        decay_low_rank_dim: int | None = None,
        a_low_rank_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        num_layers: int | None = None,
        value_residual: bool = True,
        v_low_rank_dim: int | None = None,
    ):
        super().__init__()
        value_dim = hidden_size if value_dim is None else value_dim
        if hidden_size % num_heads or value_dim % num_heads or hidden_size // num_heads < 2:
            raise ValueError(
                f"RWKV7Attention: num_heads={num_heads} must divide hidden_size={hidden_size} and "
                f"value_dim={value_dim} with head_dim >= 2"
            )
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.key_dim, self.value_dim = hidden_size, value_dim
        self.head_dim, self.head_v_dim = hidden_size // num_heads, value_dim // num_heads
        factor = self.head_dim / 64
        decay_low_rank_dim = decay_low_rank_dim or _lora_rank(2.5, hidden_size, factor)
        a_low_rank_dim = a_low_rank_dim or _lora_rank(2.5, hidden_size, factor)
        gate_low_rank_dim = gate_low_rank_dim or _lora_rank(5.0, hidden_size)
        self.num_layers = max(num_layers or 0, layer_idx + 1, 2)

        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
            setattr(self, name, nn.Parameter(torch.zeros(1, 1, hidden_size)))
        self.k_k = nn.Parameter(torch.zeros(self.key_dim))
        self.k_a = nn.Parameter(torch.zeros(self.key_dim))
        self.r_k = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.r_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.w_lora = LowRankProjection(hidden_size, self.key_dim, decay_low_rank_dim, activation="tanh")
        self.a_lora = LowRankProjection(hidden_size, self.key_dim, a_low_rank_dim, activation=None)
        self.g_lora = LowRankProjection(
            hidden_size, self.value_dim, gate_low_rank_dim, activation="sigmoid", bias=False
        )
        self.v_lora = (
            LowRankProjection(
                hidden_size, self.value_dim, v_low_rank_dim or _lora_rank(1.7, hidden_size, factor), activation=None
            )
            if value_residual and layer_idx > 0
            else None
        )
        self.g_norm = nn.GroupNorm(num_heads, self.value_dim, eps=self.head_dim * norm_eps, affine=elementwise_affine)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RWKV-7's layer-dependent init (as in fla): lerp weights, decay/rate biases, orthogonal projections."""
        D, L, i = self.hidden_size, self.num_layers, self.layer_idx
        ratio_0_to_1, ratio_1_to_almost0 = i / (L - 1), 1.0 - i / L
        n = torch.arange(D, dtype=torch.float32)
        ddd = n / D
        linear = n / (D - 1) - 0.5
        half = (self.head_dim - 1) / 2
        zigzag = ((n % self.head_dim) - half) / half
        zigzag = zigzag * zigzag.abs()
        www = -6 + 6 * (n / (D - 1)) ** (1 + ratio_0_to_1**0.3)
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(self, name).copy_((1.0 - ddd ** (power * ratio_1_to_almost0)).view(1, 1, D))
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        self.k_k.copy_(0.71 - linear * 0.1)
        self.w_lora.set_bias(www + 0.5 + zigzag * 2.5)
        self.a_lora.set_bias(-0.19 + zigzag * 0.3 + linear * 0.4)
        if self.v_lora is not None:
            self.v_lora.set_bias(0.73 - linear * 0.4)
        if self.g_norm.weight is not None:
            self.g_norm.weight.fill_(((i + 1) / L) ** 0.7)
        nn.init.orthogonal_(self.r_proj.weight)
        nn.init.orthogonal_(self.k_proj.weight, gain=0.1)
        nn.init.orthogonal_(self.v_proj.weight)
        nn.init.zeros_(self.o_proj.weight)

    def state_spec(self) -> dict[str, StateSpec]:
        return {
            "recurrent": StateSpec((self.num_heads, self.head_dim, self.head_v_dim), kind="matrix"),
            "shift": StateSpec((self.hidden_size,), None, "window", 1),
        }

    def fla_cp_ops(self) -> tuple[str, ...]:
        return ("chunk_rwkv7", "token_shift") if self.head_dim <= FLA_CP_MAX_HEAD_DIM else ()

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        cp_context = None if ctx is None else ctx.cp_context
        delta, shift_ND = token_shift(x, None if state is None else state["shift"], cu_seqlens, cp_context=cp_context)
        xr, xw, xk, xv, xa, xg = (
            torch.addcmul(x, delta, mu) for mu in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        r = self.r_proj(xr)
        w = LOG_DECAY_MIN * rec.acc(self.w_lora(xw)).sigmoid()  # log decay
        k = self.k_proj(xk)
        v = self.v_proj(xv)
        if ctx is not None and self.layer_idx == 0:
            ctx.v_first = v
        elif ctx is not None and self.v_lora is not None and ctx.v_first is not None:
            v = torch.lerp(v, ctx.v_first.to(v.dtype), self.v_lora(xv).sigmoid())
        a = self.a_lora(xa).sigmoid()
        g = self.g_lora(xg)
        kk_BTHK = F.normalize((k * self.k_k).unflatten(-1, (H, K)), dim=-1)
        k = k.addcmul(k * (a - 1), self.k_a)  # k * (1 + (a - 1) k_a)
        r_BTHK, k_BTHK, a_BTHK = (t.unflatten(-1, (H, K)) for t in (r, k, a))
        v_BTHV = v.unflatten(-1, (H, self.head_v_dim))
        recurrent = rec.use_recurrent_kernel(self, state, T)
        # as fla's layer: the decay bound lets fla's chunk kernel use its 64-token tensor-core scheme
        tuning = {} if recurrent else {"safe_gate": True, "lower_bound": LOG_DECAY_MIN, "chunk_size": 64}
        o_BTHV, s_BHKV = rec.op("rwkv7", recurrent)(
            r=r_BTHK,
            w=w.unflatten(-1, (H, K)),
            k=k_BTHK,
            v=v_BTHV,
            a=-kk_BTHK,
            b=kk_BTHK * a_BTHK,
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
            cp_context=cp_context,
            **tuning,
        )
        o = self.g_norm(o_BTHV.reshape(B * T, self.value_dim)).view(B, T, self.value_dim)
        bonus_BTH1 = (r_BTHK * k_BTHK * self.r_k).sum(-1, keepdim=True)
        o = (o + (bonus_BTH1 * v_BTHV).flatten(-2)) * g
        return self.o_proj(o), {"recurrent": s_BHKV, "shift": shift_ND}

    def sequence_flops(self, seq_len: int) -> float:
        # Chunked generalized delta rule (DPLR, WY form): like DeltaNet's plus the a/b products per chunk.
        return self.num_heads * rec.chunked_flops(
            seq_len, self.head_dim, self.head_v_dim, extra_ck=4, extra_cv=1, extra_kv=2
        )
