"""HGRN's element-wise gated recurrence (arXiv:2311.04823): h_t = exp(g_t) * h_t-1 + x_t, o_t = h_t,
with `x, g [B, T, D]` (no heads; `g` is the log forget gate) and state `[N, D]`.

fla's `chunk_hgrn` takes no `cu_seqlens` and gives no gradient to the initial or final state: on CUDA such calls
are routed to fla's `fused_recurrent_hgrn` (which supports both). The PyTorch chunk form runs the shared chunk engine with one
"head" per channel and K = V = 1.
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import checks
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch, needs_grad

Tensor = torch.Tensor
CHUNK_SIZE = 16  # the intra-chunk decay tensor is [C, C] per channel


def _check(name: str, a: Args) -> None:
    x = a["x"]
    if x.dim() != 3:
        raise ValueError(f"{name}: `x` must be [B, T, D] (3-D; HGRN has no heads), got shape {tuple(x.shape)}")
    checks.expect_shape(name, "g", a["g"], tuple(x.shape), "x.shape [B, T, D]")
    checks.check_varlen(name, x, a["cu_seqlens"])
    n = x.shape[0] if a["cu_seqlens"] is None else len(a["cu_seqlens"]) - 1
    checks.expect_shape(name, "initial_state", a["initial_state"], (n, x.shape[2]), "[N, D]")


def _run(engine, x, g, initial_state, output_final_state, cu_seqlens, **opts):
    ones = x.new_ones(*x.shape, 1)
    h0 = None if initial_state is None else initial_state[..., None, None]
    o, s = cc.packed(lambda x_, g_, one: engine(one, one, x_[..., None], g_, 1.0, h0, **opts), cu_seqlens, x, g, ones)
    return o[..., 0].to(x.dtype), (s[..., 0, 0] if output_final_state else None)


@checked(_check)
def chunk_hgrn_torch(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked form. x, g `[B, T, D]`, initial_state `[N, D]` -> o `[B, T, D]`, final `[N, D]` or None."""
    return _run(
        cc.chunk_gated,
        x,
        g,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


@checked(_check)
def fused_recurrent_hgrn_torch(
    x: Tensor,
    g: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path); same shapes as `chunk_hgrn_torch`."""
    return _run(cc.recurrent_gated, x, g, initial_state, output_final_state, cu_seqlens)


def _fla_chunk_hgrn_is_exact(
    x: Tensor, g: Tensor, initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None
) -> bool:
    """fla's `chunk_hgrn` takes no cu_seqlens, and its backward drops the gradients of both states (no dh0,
    dht ignored): use it only when neither state needs a gradient."""
    if cu_seqlens is not None:
        return False
    a = {"x": x, "g": g, "initial_state": initial_state}
    return not needs_grad(a, "initial_state") and not (output_final_state and needs_grad(a, "x", "g"))


STATE = ("x", "g", "initial_state", "output_final_state")
FUSED_RECURRENT = FlaCall("ops.hgrn", "fused_recurrent_hgrn", (*STATE, "cu_seqlens"), positional=5)
chunk_hgrn = fla_dispatch(
    chunk_hgrn_torch,
    FlaCall(
        "ops.hgrn",
        "chunk_hgrn",
        STATE,
        positional=4,
        drops=("cu_seqlens",),
        when=lambda a: _fla_chunk_hgrn_is_exact(
            a["x"], a["g"], a["initial_state"], a["output_final_state"], a["cu_seqlens"]
        ),
    ),
    FUSED_RECURRENT,
    note="Packed calls and calls that need a gradient through a state run fla's `fused_recurrent_hgrn` "
    "(`_fla_chunk_hgrn_is_exact`); `cu_seqlens` is our addition (fla's `chunk_hgrn` has none).",
)
fused_recurrent_hgrn = fla_dispatch(fused_recurrent_hgrn_torch, FUSED_RECURRENT)
