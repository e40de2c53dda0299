"""HGRN token mixer: gated linear RNN with an element-wise (vector) state and a forget-gate lower bound."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from linear_moe.mixers import _recurrent as rec
from linear_moe.mixers._parts import GatedOutput, Projections
from linear_moe.mixers.base import MixerContext, MixerState, StateSpec, Tensor


def initial_lower_bound(layer_idx: int, num_layers: int) -> float:
    """HGRN's forget-gate floor of layer `layer_idx` at initialisation: layer_idx / num_layers. This is what the
    paper's cumulative softmax over layers gives with its zero-initialised logits (arXiv:2311.04823, Sec. 3.2):
    0 for the first layer, rising with depth."""
    return layer_idx / num_layers


def add_lower_bound(mixer: nn.Module, dim: int, num_layers: int | None) -> None:
    """Register the layer's own learned floor `lower_bound_logit` [dim] (gamma = sigmoid(logit)), started at
    `initial_lower_bound`; the first layer has none (its floor is 0), as in the paper. The layer owns its bound, so
    a pipeline stage needs nothing from other layers."""
    num_layers = max(num_layers or 0, mixer.layer_idx + 1)
    gamma = initial_lower_bound(mixer.layer_idx, num_layers)
    logit = torch.full((dim,), math.log(gamma / (1 - gamma))) if gamma > 0 else None
    mixer.lower_bound_logit = None if logit is None else nn.Parameter(logit)
    if logit is not None:
        mixer.lower_bound_logit._no_weight_decay = True


def bounded_log_forget(f_raw: torch.Tensor, lower_bound_logit: torch.Tensor | None) -> torch.Tensor:
    """log of the forget gate lambda = gamma + (1 - gamma) sigmoid(f_raw) with gamma = sigmoid(lower_bound_logit)
    (no floor when None), float32 or wider."""
    f = F.logsigmoid(rec.acc(f_raw))
    if lower_bound_logit is None:
        return f
    b = rec.acc(lower_bound_logit)
    return torch.logaddexp(F.logsigmoid(b), F.logsigmoid(-b) + f)


class HGRNAttention(Projections, GatedOutput):
    """HGRN: h_t = lambda_t * h_{t-1} + (1 - lambda_t) * silu(i_t), o_t = rmsnorm(h_t) * silu(g_t), element-wise,
    with forget gate lambda_t = gamma + (1 - gamma) sigmoid(f_t) bounded below by the layer's gamma.

    "Hierarchically Gated Recurrent Neural Network for Sequence Modeling", arXiv:2311.04823.
    Follows fla's `HGRNAttention` (names i_proj, f_proj, g_proj, i_conv1d, f_conv1d, g_norm, o_proj).

    Options (fla defaults): expand_ratio (1): state width I = hidden_size * expand_ratio; use_short_conv (False),
    conv_size (4), conv_bias (False): conv (no activation) on i and f; elementwise_affine (True); norm_eps (1e-5).
    `num_heads` is accepted for the common interface; HGRN is element-wise and does not use it.
    num_layers (None -> layer_idx + 1): the depth the initial floor gamma = layer_idx / num_layers is spread over.
    The layer owns its floor (`lower_bound_logit` [I], gamma = sigmoid of it; none in layer 0, whose floor is 0):
    fla keeps the floors of all layers as one model parameter (a cumulative softmax over layers), which would tie
    every layer to every other; here each layer learns its own, started where fla's starts.
    State: `recurrent` [B, I] (float32), plus `conv_i`/`conv_f` [B, I, W-1] with short convs.
    """

    uses_num_layers = True

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
        num_layers: int | None = None,
    ):
        super().__init__()
        if expand_ratio < 1 or int(expand_ratio) != expand_ratio:
            raise ValueError(f"HGRNAttention: expand_ratio must be a positive integer, got {expand_ratio!r}")
        self.hidden_size, self.num_heads, self.layer_idx = hidden_size, num_heads, layer_idx
        self.input_dim = hidden_size * int(expand_ratio)
        dims = {"i": self.input_dim, "f": self.input_dim}
        self.add_projections(dims, use_short_conv, conv_size, conv_bias, conv_activation=None)
        self.add_output(self.input_dim, self.input_dim, "swish", norm_eps, "g_norm", elementwise_affine)
        add_lower_bound(self, self.input_dim, num_layers)

    def state_spec(self) -> dict[str, StateSpec]:
        return {"recurrent": StateSpec((self.input_dim,), kind="diagonal"), **self.conv_spec()}  # lambda_t

    def mix(self, x: Tensor, state: MixerState | None, cu_seqlens: Tensor | None, keep: bool, ctx: MixerContext | None):
        (i, f), new_state = self.project(x, state, cu_seqlens, keep)
        log_f_BTI = bounded_log_forget(f, self.lower_bound_logit)
        i_BTI = F.silu(rec.acc(i)) * -torch.expm1(log_f_BTI)  # (1 - lambda) silu(i), float32: fla's state dtype

        fn = rec.op("hgrn", rec.use_recurrent_kernel(self, state, x.shape[1]))
        o_BTI, h_BI = fn(
            x=i_BTI,
            g=log_f_BTI,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=keep,
            cu_seqlens=cu_seqlens,
        )
        return self.output(o_BTI.to(x.dtype), x), {"recurrent": h_BI, **new_state}

    def sequence_flops(self, seq_len: int) -> float:
        # Element-wise scan: h = lambda h + x and the input gating, a few FLOPs per channel per token.
        return 4.0 * self.input_dim
