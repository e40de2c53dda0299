"""Plumbing shared by the recurrent mixers (DeltaNet, Gated DeltaNet, Mamba2, RWKV-6/7, HGRN, HGRN2):
input/state checks, the chunk-vs-recurrent kernel choice, lazy op lookup and the short convolutions.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from linear_moe.layers.conv import ShortConvolution
from linear_moe.mixers.base import Mixer, MixerState
from linear_moe.ops._dispatch import check_varlen

DECODE_MAX_LEN = 64  # inputs this short with a state use the token-loop (fused_recurrent) kernels


def check_call(
    mixer: Mixer, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None, keys: Sequence[str]
) -> None:
    """Validate hidden states, packing and that `state` carries exactly the rows and keys this mixer needs."""
    name = type(mixer).__name__
    Mixer.check_input(name, x, mixer.hidden_size)
    check_varlen(name, x, cu_seqlens)
    if state is None:
        return
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{name}: state is missing {missing}; a state from this mixer has keys {list(keys)}")
    n = x.shape[0] if cu_seqlens is None else len(cu_seqlens) - 1
    for k in keys:
        if state[k].shape[0] != n:
            raise ValueError(f"{name}: state[{k!r}] has {state[k].shape[0]} rows, expected {n} (batch or documents)")


def acc(t: torch.Tensor) -> torch.Tensor:
    """`t` in its accumulation dtype: float32 for half precision, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def use_recurrent_kernel(mixer: nn.Module, state: MixerState | None, seq_len: int) -> bool:
    """Decoding (state given, short input, not training) runs `fused_recurrent_*`; everything else `chunk_*`."""
    return state is not None and seq_len <= DECODE_MAX_LEN and not mixer.training


def op(family: str, recurrent: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """`linear_moe.ops.<family>.{chunk,fused_recurrent}_<family>`, imported on first use."""
    module = importlib.import_module(f"linear_moe.ops.{family}")
    return getattr(module, f"{'fused_recurrent' if recurrent else 'chunk'}_{family}")


def run_short_convs(
    convs: dict[str, ShortConvolution],
    inputs: dict[str, torch.Tensor],
    state: MixerState | None,
    cu_seqlens: torch.Tensor | None,
    keep: bool = True,
) -> tuple[list[torch.Tensor], MixerState]:
    """Run `convs[name](inputs[name])` with state key `conv_<name>`; return outputs (in order) and the new states
    (an empty dict unless `keep`: training skips computing them)."""
    outs, new_state = [], {}
    for name, x in inputs.items():
        y, s = convs[name](x, None if state is None else state[f"conv_{name}"], cu_seqlens, output_final_state=keep)
        outs.append(y)
        if keep:
            new_state[f"conv_{name}"] = s
    return outs, new_state


def conv_state_keys(names: Sequence[str]) -> list[str]:
    return [f"conv_{n}" for n in names]


def init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> torch.Tensor:
    """Mamba's time-step bias init: softplus^-1 of dt ~ log-uniform [dt_min, dt_max] (floored), shape [n]."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


def chunked_flops(
    seq_len: int, k: int, v: int, chunk_size: int = 64, extra_ck: int = 0, extra_cv: int = 0, extra_kv: int = 0
) -> float:
    """FLOPs per token per head of a chunked linear recurrence with key dim k, value dim v and chunk C:
    intra-chunk scores q.k^T (C*k), scores.v (C*v), inter-chunk read q.S (k*v) and state update k^T.v (k*v),
    plus method-specific extra multiply-adds per token (`extra_ck * C*k + extra_cv * C*v + extra_kv * k*v`).
    Each multiply-add counts 2 FLOPs; causal halves are not discounted (the kernels compute full blocks)."""
    c = min(chunk_size, max(seq_len, 1))
    return 2.0 * ((1 + extra_ck) * c * k + (1 + extra_cv) * c * v + (2 + extra_kv) * k * v)


def gated_output(mixer: nn.Module, o_BTHV: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`o_proj(o_norm(o, g_proj(x)))` with an output gate (`mixer.use_gate`), `o_proj(o_norm(o))` without."""
    if mixer.use_gate:
        o_BTHV = mixer.o_norm(o_BTHV, mixer.g_proj(x).unflatten(-1, o_BTHV.shape[-2:]))
    else:
        o_BTHV = mixer.o_norm(o_BTHV)
    return mixer.o_proj(o_BTHV.flatten(-2))
