"""Triton kernels of the MoE layer (issue 15): moving rows back to their tokens (the combine and the backward of
the gather), and the routed experts' weighted SwiGLU (`routed_swiglu`, at the end of this module).

One operation serves both, a gather-sum over each token's K rows through the row map `rows_TK` [T, K] (the
dispatch position of assignment (t, j), -1 where the capacity dropped it; `Dispatch.row_Tk`):

    gather_sum(y [N, D], rows [T, K], weights [T, K] | None) -> out [T, D]
        out[t] = sum_j weights[t, j] * y[rows[t, j]]       `combine` (router weights), float32 accumulation
        out[t] = sum_j y[rows[t, j]]                       backward of the token gather (`_GatherRows`)
    backward, one kernel: dy[rows[t, j]] = weights[t, j] * dout[t] (every kept row is used once: no atomics),
                          dw[t, j] = <dout[t], y[rows[t, j]]> (float32 dot; 0 for dropped slots)

`y` is read once and `out` written once (the PyTorch path first copies the rows to (token, slot) order, then runs a
[1, K] x [K, D] bmm per token, and saves the copy for backward). The op is a `torch.library.custom_op` with a
fake implementation and an autograd formula, so torch.compile'd blocks keep it as one opaque call.

Used (`use_moe_kernels`) on CUDA tensors when triton can be imported, unless `LINEAR_MOE_MOE_KERNELS=0` (or
`LINEAR_MOE_KERNELS=torch`, which turns off every kernel); also on CPU tensors under `TRITON_INTERPRET=1`
(Triton's interpreter, how the kernels are checked without a GPU). Importing this module does not import triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_TRITON = importlib.util.find_spec("triton") is not None


def use_moe_kernels(x: torch.Tensor) -> bool:
    """Whether the MoE combine / gather backward on `x` runs the Triton kernels (see the module docstring)."""
    if os.environ.get("LINEAR_MOE_MOE_KERNELS", "1") == "0" or os.environ.get("LINEAR_MOE_KERNELS") == "torch":
        return False
    return _TRITON and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@torch.library.custom_op("linear_moe::moe_gather_sum", mutates_args=())
def gather_sum(y_ND: torch.Tensor, rows_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
    """[T, D] in y's dtype: out[t] = sum_j weights[t, j] * y[rows[t, j]] (weights None: 1; rows -1: skipped)."""
    from linear_moe.moe import combine_triton

    return combine_triton.gather_sum(y_ND, rows_TK, weights_TK)


@gather_sum.register_fake
def _(y_ND: torch.Tensor, rows_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
    return y_ND.new_empty(rows_TK.shape[0], y_ND.shape[1])


@torch.library.custom_op("linear_moe::moe_gather_sum_backward", mutates_args=())
def gather_sum_backward(
    g_TD: torch.Tensor,
    y_ND: torch.Tensor,
    rows_TK: torch.Tensor,
    weights_TK: torch.Tensor | None,
    need_dy: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, D] in y's dtype, dw [T, K] in the weights' dtype) of `gather_sum`; those not needed are undefined."""
    from linear_moe.moe import combine_triton

    return combine_triton.gather_sum_backward(g_TD, y_ND, rows_TK, weights_TK, need_dy, need_dw)


@gather_sum_backward.register_fake
def _(g_TD, y_ND, rows_TK, weights_TK, need_dy, need_dw):
    dtype = (y_ND if weights_TK is None else weights_TK).dtype
    return y_ND.new_empty(y_ND.shape), rows_TK.new_empty(rows_TK.shape, dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    y_ND, rows_TK, weights_TK = inputs
    # y only where dw needs it: an unweighted sum (rows already weighted by the experts) keeps nothing of [N, D]
    ctx.save_for_backward(y_ND if weights_TK is not None else None, rows_TK, weights_TK)
    ctx.y_shape, ctx.y_dtype = y_ND.shape, y_ND.dtype


def _backward(ctx, g_TD: torch.Tensor):
    y_ND, rows_TK, weights_TK = ctx.saved_tensors
    need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if y_ND is None:  # unweighted: y's shape and dtype only (a stride-0 view, never read)
        y_ND = g_TD.new_zeros((), dtype=ctx.y_dtype).expand(ctx.y_shape)
    dy_ND, dw_TK = gather_sum_backward(g_TD, y_ND, rows_TK, weights_TK, need_dy, need_dw)
    return dy_ND if need_dy else None, None, dw_TK if need_dw else None


gather_sum.register_autograd(_backward, setup_context=_setup_context)


# --- the routed experts' weighted SwiGLU (`moe/experts.py: _RoutedSwiGLU`; kernels in `moe/swiglu_triton.py`) ---


def swiglu_torch(h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
    """[N, F] in h's dtype: silu(gate) * up * weights[:, None] (gate | up = the halves of h), in float32."""
    gate, up = h_N2F.float().chunk(2, dim=-1)
    a = torch.nn.functional.silu(gate) * up
    return (a if weights_N is None else a * weights_N.float()[:, None]).to(h_N2F.dtype)


def swiglu_backward_torch(
    h_N2F: torch.Tensor, weights_N: torch.Tensor | None, da_NF: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a recomputed [N, F], dh [N, 2F], dw [N] or None) of `swiglu_torch` for the gradient da of a, in float32."""
    gate, up = h_N2F.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    s, da = silu * up, da_NF.float()
    w = None if weights_N is None else weights_N.float()[:, None]
    a, ds = (s, da) if w is None else (s * w, da * w)
    dh = torch.cat([ds * up * sig * (1 + gate * (1 - sig)), ds * silu], dim=-1)
    dw = (da * s).sum(-1).to(weights_N.dtype) if need_dw and weights_N is not None else None
    return a.to(h_N2F.dtype), dh.to(h_N2F.dtype), dw


@torch.library.custom_op("linear_moe::moe_swiglu", mutates_args=())
def _swiglu_op(h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
    from linear_moe.moe import swiglu_triton

    return swiglu_triton.swiglu(h_N2F, weights_N)


@_swiglu_op.register_fake
def _(h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
    return h_N2F.new_empty(h_N2F.shape[0], h_N2F.shape[1] // 2)


@torch.library.custom_op("linear_moe::moe_swiglu_backward", mutates_args=())
def _swiglu_backward_op(
    h_N2F: torch.Tensor, weights_N: torch.Tensor | None, da_NF: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from linear_moe.moe import swiglu_triton

    return swiglu_triton.swiglu_backward(h_N2F, weights_N, da_NF, need_dw)


@_swiglu_backward_op.register_fake
def _(h_N2F, weights_N, da_NF, need_dw):
    dtype = torch.float32 if weights_N is None else weights_N.dtype
    return da_NF.new_empty(da_NF.shape), h_N2F.new_empty(h_N2F.shape), h_N2F.new_empty(h_N2F.shape[0], dtype=dtype)


def routed_swiglu(h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
    """a [N, F] = silu(gate) * up * weights[:, None] from the gate | up rows h [N, 2F] (weights None: 1): the
    Triton kernel where `use_moe_kernels(h)`, else `swiglu_torch`. No autograd: `_RoutedSwiGLU` calls both
    directions itself."""
    return _swiglu_op(h_N2F, weights_N) if use_moe_kernels(h_N2F) else swiglu_torch(h_N2F, weights_N)


def routed_swiglu_backward(
    h_N2F: torch.Tensor, weights_N: torch.Tensor | None, da_NF: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a recomputed, dh, dw or None) for the gradient da of `routed_swiglu`'s output, in one pass over the rows
    with the kernels."""
    if not use_moe_kernels(h_N2F):
        return swiglu_backward_torch(h_N2F, weights_N, da_NF, need_dw)
    a_NF, dh_N2F, dw_N = _swiglu_backward_op(h_N2F, weights_N, da_NF, need_dw)
    return a_NF, dh_N2F, dw_N if need_dw and weights_N is not None else None
