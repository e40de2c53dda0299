"""Lightning attention token mixer (linear attention with fixed per-head decay, MiniMax-01 style)."""

from __future__ import annotations

import torch

from linear_moe.mixers import _linear
from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor
from linear_moe.mixers.feature_maps import ELEMENTWISE


def lightning_slopes(
    num_heads: int, layer_idx: int = 0, num_layers: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Per-head decay rates [H] (float32): lambda_h = exp(-slope_h), slope_h = 2^(-8 (h+1) / H) (ALiBi's slopes),
    scaled by MiniMax-01's layer factor 1 - layer_idx / (num_layers - 1) (+1e-5) when num_layers is given, so
    deeper layers decay more slowly. Made per call (not a buffer) so bfloat16 casts cannot round it."""
    slopes = 2.0 ** (-8.0 * (torch.arange(num_heads, dtype=torch.float32, device=device) + 1) / num_heads)
    if num_layers is None:
        return slopes
    return slopes * (1 - layer_idx / (num_layers - 1 + 1e-5) + 1e-5)


class LightningAttention(_linear.LinearMixer):
    """Lightning attention: S_t = lambda_h S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t on silu(q), silu(k), silu(v),
    with fixed per-head decays lambda_h = exp(-slope_h) (ALiBi slopes, optionally layer dependent), then RMSNorm
    over all heads times a sigmoid output gate, and o_proj. "Lightning Attention-2", arXiv:2401.04658;
    "MiniMax-01: Scaling Foundation Models with Lightning Attention", arXiv:2501.08313 (layer-dependent slopes,
    norm and gate). Runs on the simple_gla ops with `g_gamma = -slope`.

    Options:
        expand_k (1.0), expand_v (1.0): key / value width = hidden_size * ratio, split over heads.
        num_kv_heads (None -> num_heads): grouped k/v heads.
        activation ('silu'; None for none): elementwise map on q, k, v (a name in feature_maps.ELEMENTWISE).
        scale (1.0 as in MiniMax-01; None -> 1/sqrt(d_k)).
        num_layers (None): with the model's depth, slopes shrink with layer_idx as in MiniMax-01.
        use_output_gate (True), gate_fn ('sigmoid' | 'swish'), norm_per_head (False: one RMSNorm over all heads,
        as MiniMax-01), norm_eps (1e-6).
        use_short_conv (False), conv_size (4), conv_bias (False): causal depthwise conv (silu) on q, k, v.
        seq_split (0 = off), seq_split_local ('op'): run rows or packed documents longer than seq_split tokens
        through pieces of seq_split tokens side by side (`ops/split.py`, same results; see GatedLinearAttention).
        Measured slower here (1 x 65,536 tokens on the H200: -2%; the unsplit kernel is already near its 2K speed).
    State: `recurrent` [B, H, K, V] (float32), conv_q/k/v [B, C, W-1] with short convs.
    """

    uses_num_layers = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        layer_idx: int = 0,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        num_kv_heads: int | None = None,
        activation: str | None = "silu",
        scale: float | None = 1.0,
        num_layers: int | None = None,
        use_output_gate: bool = True,
        gate_fn: str = "sigmoid",
        norm_per_head: bool = False,
        norm_eps: float = 1e-6,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        seq_split: int = 0,
        seq_split_local: str = "op",
    ):
        super().__init__()
        rec.check_seq_split("LightningAttention", seq_split, seq_split_local)
        if activation is not None and activation not in ELEMENTWISE:
            raise ValueError(
                f"LightningAttention: unknown activation {activation!r}; valid: None, {', '.join(ELEMENTWISE)}"
            )
        if num_layers is not None and not 0 <= layer_idx < num_layers:
            raise ValueError(f"LightningAttention: layer_idx={layer_idx} must be in [0, num_layers={num_layers})")
        hk, hv, hkv = _linear.head_dims("LightningAttention", hidden_size, num_heads, expand_k, expand_v, num_kv_heads)
        self._init_qkv(hidden_size, num_heads, layer_idx, hk, hv, hkv, use_short_conv, conv_size, conv_bias)
        self._init_output(use_output_gate, gate_fn, norm_eps, norm_per_head)
        self.act = None if activation is None else ELEMENTWISE[activation]
        self.scale, self.num_layers = scale, num_layers
        self.total_heads = num_heads  # the slopes depend on the layer's head count (a tp rank runs a slice)
        self.seq_split, self.seq_split_local = seq_split, seq_split_local

    def log_decay(self, device: torch.device | None = None) -> torch.Tensor:
        """log lambda_h = -slope_h of this module's heads h = head_offset .. head_offset + num_heads - 1, [H]
        float32."""
        slopes = lightning_slopes(self.total_heads, self.layer_idx, self.num_layers, device)
        return -slopes[self.head_offset : self.head_offset + self.num_heads]

    def state_spec(self) -> dict[str, StateSpec]:
        shape = (self.num_heads, self.head_k_dim, self.head_v_dim)
        spec = {"recurrent": StateSpec(shape, kind="diagonal")}  # a decay per head
        return {**spec, **self.conv_spec()}

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        q, k, v, new_state = self.project_qkv(x, state, cu_seqlens, keep)
        if self.act is not None:
            q, k, v = self.act(q), self.act(k), self.act(v)
        k, v = self.repeat_kv(k, v)
        if rec.use_recurrent_kernel(self, state, x.shape[1]):
            fn = rec.op("simple_gla", True)
        else:
            fn = rec.chunk_op("simple_gla", x.shape[1], self.seq_split, self.seq_split_local)
        o_BTHV, s = fn(
            q=q,
            k=k,
            v=v,
            g_gamma=self.log_decay(x.device),
            scale=self.scale,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        y = self.output(o_BTHV, x)
        return y, {"recurrent": s, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        return self.num_heads * rec.chunked_flops(seq_len, self.head_k_dim, self.head_v_dim)
