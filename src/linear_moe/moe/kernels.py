"""Triton kernels for moving MoE rows back to their tokens (issue 15): the combine and the backward of the gather.

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
    ctx.save_for_backward(y_ND, rows_TK, weights_TK)


def _backward(ctx, g_TD: torch.Tensor):
    y_ND, rows_TK, weights_TK = ctx.saved_tensors
    need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dy_ND, dw_TK = gather_sum_backward(g_TD, y_ND, rows_TK, weights_TK, need_dy, need_dw)
    return dy_ND if need_dy else None, None, dw_TK if need_dw else None


gather_sum.register_autograd(_backward, setup_context=_setup_context)
