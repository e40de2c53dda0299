"""Causal softmax attention (the "full attention" layers of hybrid models), with RoPE, GQA and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.layers.norm import RMSNorm
from linear_moe.mixers.base import Mixer, MixerContext, MixerState
from linear_moe.mixers.rotary import RotaryEmbedding
from linear_moe.ops import varlen
from linear_moe.ops.checks import check_varlen


class Attention(Mixer):
    """Multi-head causal softmax attention, softmax(q k^T / sqrt(d) + causal mask) v ("Attention Is All You Need",
    arXiv:1706.03762), with rotary positions (arXiv:2104.09864) and grouped-query attention (arXiv:2305.13245).
    Follows fla's `Attention` layer; runs `F.scaled_dot_product_attention` (flash kernels on GPU).

    Options:
        num_kv_heads (None -> num_heads): key/value heads; must divide num_heads (GQA / MQA).
        head_dim (None -> hidden_size // num_heads).
        qkv_bias (False): biases on q_proj, k_proj, v_proj.
        qk_norm (False): RMSNorm over the head dim of q and k (`q_norm`, `k_norm`) before RoPE.
        rope_theta (10000.0; None disables RoPE), rotary_dim (None -> head_dim): RoPE base and rotated channels.
        norm_eps (1e-6): eps of the qk norms.
    State (KV cache, after RoPE): `k`, `v` [B, Hkv, S, D]; plus `valid` [B, S] bool when rows hold different
    numbers of tokens (packed prefill of unequal documents): invalid slots are masked out and not counted
    as positions. With cu_seqlens every document attends only to itself and RoPE restarts per document.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        rope_theta: float | None = 10000.0,
        rotary_dim: int | None = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"Attention: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
                f"(valid: {[h for h in range(1, num_heads + 1) if num_heads % h == 0]})"
            )
        self.hidden_size, self.num_heads, self.num_kv_heads, self.layer_idx = (
            hidden_size,
            num_heads,
            num_kv_heads,
            layer_idx,
        )
        self.head_dim = hidden_size // num_heads if head_dim is None else head_dim
        rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
        if rope_theta is not None and not 0 < rotary_dim <= self.head_dim:
            raise ValueError(f"Attention: rotary_dim={rotary_dim} must be in (0, head_dim={self.head_dim}]")
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=norm_eps)
        self.rotary = RotaryEmbedding(rotary_dim, rope_theta) if rope_theta is not None else None

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        use_cache: bool = False,
        context: MixerContext | None = None,
    ) -> tuple[torch.Tensor, MixerState | None]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"Attention: expected hidden states [B, T, {self.hidden_size}], got shape {tuple(x.shape)}")
        check_varlen("Attention", x, cu_seqlens)
        self._check_state(x, state, cu_seqlens)
        q_BTHD = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k_BTGD = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v_BTGD = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q_BTHD, k_BTGD = self.q_norm(q_BTHD), self.k_norm(k_BTGD)
        new_valid_BT = None
        if cu_seqlens is not None:  # packed documents -> zero-padded batch [N, T_max, ...]
            lens_N = varlen.seq_lens(cu_seqlens)
            q_BTHD, k_BTGD, v_BTGD = (varlen.pad(t, cu_seqlens) for t in (q_BTHD, k_BTGD, v_BTGD))
            new_valid_BT = torch.arange(q_BTHD.shape[1], device=x.device) < lens_N[:, None]
        B, T = q_BTHD.shape[:2]
        if self.rotary is not None:
            offset_B = self._cache_lengths(state, B, x.device)
            pos_BT = offset_B[:, None] + torch.arange(T, device=x.device)
            q_BTHD, k_BTGD = self.rotary(q_BTHD, pos_BT), self.rotary(k_BTGD, pos_BT)
        q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTGD, v_BTGD))  # [B, H|Hkv, T, D]
        mask = None
        if state is not None:
            k, v = torch.cat([state["k"].to(k.dtype), k], dim=2), torch.cat([state["v"].to(v.dtype), v], dim=2)
            if T > 1 or "valid" in state:  # one new token with a full cache sees everything: no mask needed
                mask = self._cache_mask(state, T, x.device)
        o_BHTD = self._attend(q, k, v, mask)
        o_BTHD = o_BHTD.transpose(1, 2)
        if cu_seqlens is not None:
            o_BTHD = varlen.unpad(o_BTHD, cu_seqlens)
        y = self.o_proj(o_BTHD.flatten(-2))
        if not (use_cache or state is not None):
            return y, None
        return y, self._new_state(state, k, v, new_valid_BT)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:  # fresh sequence: the causal fast path (flash kernels on GPU)
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)

    @staticmethod
    def _cache_lengths(state: MixerState | None, batch: int, device: torch.device) -> torch.Tensor:
        """Number of cached tokens per row `[B]` (the position of the first new token)."""
        if state is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if "valid" in state:
            return state["valid"].sum(-1)
        return torch.full((batch,), state["k"].shape[2], dtype=torch.long, device=device)

    @staticmethod
    def _cache_mask(state: MixerState, T: int, device: torch.device) -> torch.Tensor:
        """Boolean mask [B, T, S+T]: every valid cached key, then causal over the new keys. Padded new keys at the
        end of a row are only visible to padded queries (which are dropped), so every query row sees itself."""
        B, S = state["k"].shape[0], state["k"].shape[2]
        cache_BS = state["valid"] if "valid" in state else torch.ones(B, S, dtype=torch.bool, device=device)
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return torch.cat([cache_BS[:, None, :].expand(B, T, S), causal_TT.expand(B, T, T)], dim=-1)

    @staticmethod
    def _new_state(
        state: MixerState | None, k: torch.Tensor, v: torch.Tensor, new_valid_BT: torch.Tensor | None
    ) -> MixerState:
        new: MixerState = {"k": k, "v": v}
        B, S_new = k.shape[0], k.shape[2]
        if new_valid_BT is not None and bool(new_valid_BT.all()):
            new_valid_BT = None
        if (state is None or "valid" not in state) and new_valid_BT is None:
            return new
        T = S_new - (0 if state is None else state["k"].shape[2])
        old = (
            []
            if state is None
            else [
                state["valid"]
                if "valid" in state
                else torch.ones(B, state["k"].shape[2], dtype=torch.bool, device=k.device)
            ]
        )
        fresh = new_valid_BT if new_valid_BT is not None else torch.ones(B, T, dtype=torch.bool, device=k.device)
        new["valid"] = torch.cat(old + [fresh], dim=-1)
        return new

    def _check_state(self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None) -> None:
        if state is None:
            return
        if "k" not in state or "v" not in state:
            raise ValueError(f"Attention: state must hold 'k' and 'v' [B, Hkv, S, D], got keys {list(state)}")
        n = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        want = (n, self.num_kv_heads, state["k"].shape[2], self.head_dim)
        for key in ("k", "v"):
            if tuple(state[key].shape) != want:
                raise ValueError(f"Attention: state[{key!r}] has shape {tuple(state[key].shape)}, expected {want}")

    def sequence_flops(self, seq_len: int) -> float:
        # Causal q.k^T and p.v: on average (seq_len + 1) / 2 keys per query, 2 FLOPs per multiply-add each.
        return 2 * 2 * self.num_heads * self.head_dim * (seq_len + 1) / 2
