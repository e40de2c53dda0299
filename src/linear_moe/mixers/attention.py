"""Causal softmax attention (the "full attention" layers of hybrid models), with RoPE, GQA and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linear_moe.layers.norm import RMSNorm
from linear_moe.mixers.base import Mixer, MixerContext, MixerState, StateSpec
from linear_moe.mixers.rotary import RotaryEmbedding
from linear_moe.ops import varlen


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
    State (KV cache, after RoPE): `k`, `v` [B, Hkv, S, D] and `valid` [B, S] bool. Row b's tokens fill slots
    0..L_b-1 (`valid`), so rows may hold different numbers of tokens (packed prefill of unequal documents); the
    next tokens are written in place at slot L_b and see only valid slots. `init_state(B, max_seq_len=S)`
    preallocates S slots, so decoding never reallocates. With cu_seqlens every document attends only to itself
    and RoPE restarts per document.
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

    kv_cache = True  # the state grows with the context: a KV cache of `max_seq_len` slots (generation sizes it)

    def state_spec(self, max_seq_len: int = 0) -> dict[str, StateSpec]:
        """`k`, `v` [Hkv, S, D] in the compute dtype and `valid` [S] (bool) for a cache of S = `max_seq_len` slots."""
        kv = StateSpec((self.num_kv_heads, max_seq_len, self.head_dim), None, "cache")
        return {"k": kv, "v": kv, "valid": StateSpec((max_seq_len,), torch.bool, "cache")}

    def init_state(self, batch_size: int, device=None, dtype=None, max_seq_len: int | None = None) -> MixerState:
        """An empty KV cache of `max_seq_len` slots per row (no valid slot: equivalent to `state=None`); `device` and
        `dtype` (of k and v) default to the parameters'."""
        if max_seq_len is None or max_seq_len < 1:
            raise ValueError(f"Attention.init_state: max_seq_len must be a positive number of slots, got {max_seq_len}")
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        return {
            key: torch.zeros(batch_size, *spec.shape, dtype=spec.dtype or dtype, device=device)
            for key, spec in self.state_spec(max_seq_len).items()
        }

    def check_call(self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None) -> None:
        super().check_call(x, None, cu_seqlens)
        self._check_state(x, state, cu_seqlens)

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q_BTHD = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k_BTGD = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v_BTGD = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.qk_norm:
            q_BTHD, k_BTGD = self.q_norm(q_BTHD), self.k_norm(k_BTGD)
        lens_B = None
        if cu_seqlens is not None:  # packed documents -> zero-padded batch [N, T_max, ...]
            lens_B = varlen.seq_lens(cu_seqlens)
            q_BTHD, k_BTGD, v_BTGD = (varlen.pad(t, cu_seqlens) for t in (q_BTHD, k_BTGD, v_BTGD))
        B, T = q_BTHD.shape[:2]
        if lens_B is None:
            lens_B = torch.full((B,), T, dtype=torch.long, device=x.device)
        offset_B = state["valid"].sum(-1) if state is not None else torch.zeros_like(lens_B)
        if self.rotary is not None:
            pos_BT = offset_B[:, None] + torch.arange(T, device=x.device)
            q_BTHD, k_BTGD = self.rotary(q_BTHD, pos_BT), self.rotary(k_BTGD, pos_BT)
        q, k, v = (t.transpose(1, 2) for t in (q_BTHD, k_BTGD, v_BTGD))  # [B, H|Hkv, T, D]
        if state is None:  # fresh sequences: the causal fast path (flash kernels on GPU)
            o_BHTD = self._attend(q, k, v, None)
            new = {} if not keep else self._fresh_cache(k, v, lens_B)
        else:
            new = self._write(state, k, v, offset_B, lens_B)
            k_all, v_all, mask_BTS = self._visible(new, offset_B, lens_B, T)
            o_BHTD = self._attend(q, k_all.to(q.dtype), v_all.to(q.dtype), mask_BTS)
        o_BTHD = o_BHTD.transpose(1, 2)
        if cu_seqlens is not None:
            o_BTHD = varlen.unpad(o_BTHD, cu_seqlens)
        return self.o_proj(o_BTHD.flatten(-2)), new

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=gqa)

    @staticmethod
    def _fresh_cache(k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, lens_B: torch.Tensor) -> MixerState:
        """The cache after a fresh forward: exactly T slots, row b's first lens_B[b] valid."""
        valid_BT = torch.arange(k_BGTD.shape[2], device=k_BGTD.device) < lens_B[:, None]
        return {"k": k_BGTD.contiguous(), "v": v_BGTD.contiguous(), "valid": valid_BT}

    @staticmethod
    def _write(state: MixerState, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor, offset_B, lens_B) -> MixerState:
        """Write the new keys and values of row b into slots offset_B[b] + t, in place: the returned cache shares
        the given tensors (a state continued twice must be cloned first). Row b's valid slots stay 0..len-1.

        A cache too small for the new tokens (one from a `state=None` forward, which has exactly the slots it
        needed) is reallocated with twice the slots; generation preallocates with `init_state(max_seq_len)` and
        checks up front that the prompt fits. Under torch.compile / CUDA-graph capture nothing is checked (no host
        sync): the caller guarantees the room."""
        T, S = k_BGTD.shape[2], state["k"].shape[2]
        if not _static_capture():
            need = int((offset_B + T).max())  # padded entries of packed rows are written too (beyond valid)
            if need > S:
                state = _grow(state, max(need, 2 * S))
        kc, vc, valid = state["k"], state["v"], state["valid"]
        slot_BT = offset_B[:, None] + torch.arange(T, device=k_BGTD.device)
        idx = slot_BT[:, None, :, None].expand(-1, kc.shape[1], -1, kc.shape[3])
        kc.scatter_(2, idx, k_BGTD.to(kc.dtype))
        vc.scatter_(2, idx, v_BGTD.to(vc.dtype))
        valid.copy_(torch.arange(valid.shape[1], device=valid.device) < (offset_B + lens_B)[:, None])
        return {"k": kc, "v": vc, "valid": valid}

    @staticmethod
    def _visible(cache: MixerState, offset_B, lens_B, T: int):
        """Keys, values and the mask [B, T, S]: query t of row b (position offset + t) sees slots s <= its position
        that hold a token of its row (padded queries of packed rows see their row's tokens, and are dropped).
        Outside graph capture the slots beyond the longest row are not read."""
        kc, vc = cache["k"], cache["v"]
        end_B = offset_B + lens_B
        if not _static_capture():
            used = int(end_B.max())
            kc, vc = kc[:, :, :used], vc[:, :, :used]
        last_BT = torch.minimum(offset_B[:, None] + torch.arange(T, device=kc.device), end_B[:, None] - 1)
        mask_BTS = torch.arange(kc.shape[2], device=kc.device) <= last_BT[..., None]
        return kc, vc, mask_BTS

    def _check_state(self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None) -> None:
        if state is None:
            return
        n = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
        S = state["k"].shape[2] if "k" in state and state["k"].dim() == 4 else -1
        for key, spec in self.state_spec(S).items() if "k" in state else ():  # shapes first, then missing keys
            if key in state and tuple(state[key].shape) != (n, *spec.shape):
                raise ValueError(
                    f"Attention: state[{key!r}] has shape {tuple(state[key].shape)}, expected {(n, *spec.shape)}"
                )
        if any(key not in state for key in ("k", "v", "valid")):
            raise ValueError(
                f"Attention: state must hold 'k', 'v' [B, Hkv, S, D] and 'valid' [B, S], got keys {list(state)}"
            )

    def sequence_flops(self, seq_len: int) -> float:
        # Causal q.k^T and p.v: on average (seq_len + 1) / 2 keys per query, 2 FLOPs per multiply-add each.
        return 2 * 2 * self.num_heads * self.head_dim * (seq_len + 1) / 2


def _static_capture() -> bool:
    """Inside torch.compile tracing or CUDA-graph capture, where host syncs (growth checks, slicing) are not allowed."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _grow(state: MixerState, slots: int) -> MixerState:
    """A copy of the cache with `slots` slots per row (new slots empty)."""
    kc, valid = state["k"], state["valid"]
    B, G, S, D = kc.shape
    out = {key: state[key].new_zeros(B, G, slots, D) for key in ("k", "v")}
    out["valid"] = valid.new_zeros(B, slots)
    for key in ("k", "v"):
        out[key][:, :, :S] = state[key]
    out["valid"][:, :S] = valid
    return out
