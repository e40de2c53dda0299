"""Helpers of the recurrent mixers: the chunk-vs-recurrent kernel choice, lazy op lookup, the split form of the
chunked ops (`seq_split`), accumulation dtype, Mamba's time-step bias init and the FLOP count of a chunked
recurrence."""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from linear_moe.mixers.base import MixerState

DECODE_MAX_LEN = 64  # inputs this short with a state use the token-loop (fused_recurrent) kernels


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


def check_seq_split(name: str, seq_split: int, local: str) -> None:
    """The `seq_split` options of a mixer: tokens per piece (0 = off) and how the pieces' own states are found."""
    from linear_moe.ops.split import LOCAL

    if isinstance(seq_split, bool) or not isinstance(seq_split, int) or seq_split < 0:
        raise ValueError(f"{name}: seq_split must be a number of tokens per piece (0 = off), got {seq_split!r}")
    if local not in LOCAL:
        raise ValueError(f"{name}: seq_split_local must be one of {', '.join(LOCAL)}, got {local!r}")


def chunk_op(
    family: str, seq_len: int, seq_split: int = 0, local: str = "op"
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """`chunk_<family>`, or its form over pieces of `seq_split` tokens run side by side (`ops/split.py`, the same
    results) when `seq_split` is set and the input (rows, or the packed row with `cu_seqlens`) is longer than one
    piece. Packed: only documents longer than a piece are cut; building the pieces reads `cu_seqlens` on the host
    once per `cu_seqlens` tensor (one sync per forward, shared by the layers)."""
    if seq_split and seq_len > seq_split:
        split = importlib.import_module("linear_moe.ops.split")
        return functools.partial(getattr(split, f"chunk_{family}_split"), piece_len=seq_split, local=local)
    return op(family, False)


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
