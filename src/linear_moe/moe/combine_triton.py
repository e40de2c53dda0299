"""The Triton kernels behind `moe/kernels.py` (imported only when they run: this module imports triton).

Both kernels read a row map `rows_TK` [T, K] int64: the row of `y_ND` holding assignment (t, j), -1 where the
capacity dropped it (`Dispatch.row_Tk`). All offsets are int64 (T * K * D passes 2^31 at 65,536 tokens, D=4096).

    gather_sum:          out[t, :] = sum_j w[t, j] * y[rows[t, j], :]          (w = 1 without weights)
    gather_sum_backward: dy[rows[t, j], :] = w[t, j] * dout[t, :]              (each row of y is used once: a
                         dw[t, j] = sum_d dout[t, d] * y[rows[t, j], d]         scatter of distinct rows, no atomics)

Accumulation is float32 (the k products and dw's dot over D); results are stored in y's dtype (out, dy) and the
weights' dtype (dw). Block sizes are fixed by D (`_blocks`): the kernels are memory bound and one config per
hidden size keeps them free of autotuning (nothing to benchmark inside a CUDA-graph capture or a timed step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _blocks(D: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): up to 512 columns of a row (1 KiB in bf16) and 2048 elements per tile."""
    block_d = min(triton.next_power_of_2(D), 512)
    return max(2048 // block_d, 1), block_d


@triton.jit
def _gather_sum_kernel(
    y_ptr,
    w_ptr,
    rows_ptr,
    out_ptr,
    T,
    D,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_T tokens x BLOCK_D columns, the K rows of each token read once
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < T, d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(rows_ptr + t * K + j, mask=t_ok, other=-1)
        y = tl.load(y_ptr + row[:, None] * D + d[None, :], mask=(row >= 0)[:, None] & d_ok[None, :], other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + t * K + j, mask=t_ok, other=0.0).to(tl.float32)
            acc += w[:, None] * y.to(tl.float32)
        else:
            acc += y.to(tl.float32)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + t[:, None] * D + d[None, :], out, mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _gather_sum_backward_kernel(
    g_ptr,
    y_ptr,
    w_ptr,
    rows_ptr,
    dy_ptr,
    dw_ptr,
    T,
    D,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_DY: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # one program: BLOCK_T tokens, all of D in BLOCK_D steps; dout is read once, each y row once, each dy row
    # written once. dw's K columns live in one [BLOCK_T, K_POW2] tile (K need not be a power of two).
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = t < T
    cols = tl.arange(0, K_POW2)
    dw = tl.zeros((BLOCK_T, K_POW2), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        g = tl.load(g_ptr + t[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(rows_ptr + t * K + j, mask=t_ok, other=-1)
            at = row[:, None] * D + d[None, :]
            ok = (row >= 0)[:, None] & d_ok[None, :]
            if NEED_DY:
                if HAS_W:
                    w = tl.load(w_ptr + t * K + j, mask=t_ok, other=0.0).to(tl.float32)
                    tl.store(dy_ptr + at, (w[:, None] * g).to(dy_ptr.dtype.element_ty), mask=ok)
                else:
                    tl.store(dy_ptr + at, g.to(dy_ptr.dtype.element_ty), mask=ok)
            if NEED_DW:
                y = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
                dw += tl.where(cols[None, :] == j, tl.sum(g * y, axis=1)[:, None], 0.0)
    if NEED_DW:
        out = dw.to(dw_ptr.dtype.element_ty)
        tl.store(dw_ptr + t[:, None] * K + cols[None, :], out, mask=t_ok[:, None] & (cols < K)[None, :])


def gather_sum(y_ND: torch.Tensor, rows_TK: torch.Tensor, weights_TK: torch.Tensor | None) -> torch.Tensor:
    """[T, D] in y's dtype: out[t] = sum_j weights[t, j] * y[rows[t, j]] (rows -1: skipped)."""
    (T, K), D = rows_TK.shape, y_ND.shape[1]
    out_TD = y_ND.new_empty(T, D)
    if T == 0 or D == 0:
        return out_TD
    block_t, block_d = _blocks(D)
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    w = None if weights_TK is None else weights_TK.contiguous()
    _gather_sum_kernel[grid](
        y_ND.contiguous(), w, rows_TK.contiguous(), out_TD, T, D, K, w is not None, block_t, block_d
    )
    return out_TD


def gather_sum_backward(
    g_TD: torch.Tensor,
    y_ND: torch.Tensor,
    rows_TK: torch.Tensor,
    weights_TK: torch.Tensor | None,
    need_dy: bool,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy [N, D] in y's dtype, dw [T, K] in the weights' dtype) of `gather_sum`; those not needed are left empty."""
    (T, K), (N, D) = rows_TK.shape, y_ND.shape
    dy_ND = y_ND.new_empty(N, D)
    dw_TK = rows_TK.new_empty(T, K, dtype=(y_ND if weights_TK is None else weights_TK).dtype)
    need_dw = need_dw and weights_TK is not None
    if T == 0 or D == 0 or not (need_dy or need_dw):
        return dy_ND, dw_TK.zero_()
    block_t, block_d = _blocks(D)
    w = None if weights_TK is None else weights_TK.contiguous()
    _gather_sum_backward_kernel[(triton.cdiv(T, block_t),)](
        g_TD.contiguous(),
        y_ND.contiguous() if need_dw else y_ND,  # without dw, y is not read (may be a stride-0 stand-in)
        w,
        rows_TK.contiguous(),
        dy_ND,
        dw_TK,
        T,
        D,
        K,
        triton.next_power_of_2(K),
        w is not None,
        need_dy,
        need_dw,
        block_t,
        block_d,
    )
    return dy_ND, dw_TK
