"""The Triton kernels of the routed experts' weighted SwiGLU (`moe/kernels.py`; this module imports triton).

`h` [N, 2F] is the gate | up output of the first grouped GEMM (row-major, gate in columns [0, F), up in [F, 2F)),
`w` [N] the router weight of each row (optional):

    forward:   a[n, f] = silu(gate[n, f]) * up[n, f] * w[n]
    backward:  from h, w and da (the gradient of a), one pass over each row that writes
               a (recomputed: the second GEMM's weight gradient needs it, and nothing saved it),
               dh = [dgate | dup] with ds = da * w, dgate = ds * up * sig * (1 + gate * (1 - sig)), dup = ds * silu,
               dw[n] = sum_f da[n, f] * silu(gate[n, f]) * up[n, f] (float32 accumulation)

Math in float32, results stored in h's dtype (a, dh) and w's dtype (dw). Offsets are int64. Fixed block sizes:
the kernels are memory bound (no autotuning inside timed steps or CUDA-graph captures).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N, BLOCK_F = 16, 128


@triton.jit
def _swiglu_kernel(h_ptr, w_ptr, a_ptr, N, F, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = (n < N)[:, None] & (f < F)[None, :]
    at = n[:, None] * (2 * F) + f[None, :]
    gate = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + at + F, mask=ok, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up
    if HAS_W:
        a *= tl.load(w_ptr + n, mask=n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(a_ptr + n[:, None] * F + f[None, :], a.to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward_kernel(
    h_ptr,
    w_ptr,
    da_ptr,
    a_ptr,
    dh_ptr,
    dw_ptr,
    N,
    F,
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # one program: BLOCK_N rows, all of F in BLOCK_F steps (dw's sum over F stays in registers)
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = n < N
    if HAS_W:
        w = tl.load(w_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        ok = n_ok[:, None] & (f < F)[None, :]
        at_h = n[:, None] * (2 * F) + f[None, :]
        at_a = n[:, None] * F + f[None, :]
        gate = tl.load(h_ptr + at_h, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + at_h + F, mask=ok, other=0.0).to(tl.float32)
        da = tl.load(da_ptr + at_a, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        s = silu * up
        if HAS_W:
            a = s * w[:, None]
            ds = da * w[:, None]
        else:
            a = s
            ds = da
        if NEED_DW:
            dw += tl.sum(da * s, axis=1)
        tl.store(a_ptr + at_a, a.to(a_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + at_h, (ds * up * sig * (1.0 + gate * (1.0 - sig))).to(dh_ptr.dtype.element_ty), mask=ok)
        tl.store(dh_ptr + at_h + F, (ds * silu).to(dh_ptr.dtype.element_ty), mask=ok)
    if NEED_DW:
        tl.store(dw_ptr + n, dw.to(dw_ptr.dtype.element_ty), mask=n_ok)


def swiglu(h_N2F: torch.Tensor, weights_N: torch.Tensor | None) -> torch.Tensor:
    """[N, F] in h's dtype: silu(gate) * up (* weights[:, None])."""
    N, F = h_N2F.shape[0], h_N2F.shape[1] // 2
    a_NF = h_N2F.new_empty(N, F)
    if N and F:
        w = None if weights_N is None else weights_N.contiguous()
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(F, BLOCK_F))
        _swiglu_kernel[grid](h_N2F.contiguous(), w, a_NF, N, F, w is not None, BLOCK_N, BLOCK_F)
    return a_NF


def swiglu_backward(
    h_N2F: torch.Tensor, weights_N: torch.Tensor | None, da_NF: torch.Tensor, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a [N, F], dh [N, 2F], dw [N]) as the module docstring; dw is left empty unless weights and need_dw."""
    N, F = h_N2F.shape[0], h_N2F.shape[1] // 2
    a_NF, dh_N2F = h_N2F.new_empty(N, F), torch.empty_like(h_N2F)
    dw_N = h_N2F.new_empty(N, dtype=torch.float32 if weights_N is None else weights_N.dtype)
    need_dw = need_dw and weights_N is not None
    if N and F:
        w = None if weights_N is None else weights_N.contiguous()
        _swiglu_backward_kernel[(triton.cdiv(N, BLOCK_N),)](
            h_N2F.contiguous(),
            w,
            da_NF.contiguous(),
            a_NF,
            dh_N2F,
            dw_N,
            N,
            F,
            w is not None,
            need_dw,
            BLOCK_N,
            BLOCK_F,
        )
    elif need_dw:
        dw_N.zero_()
    return a_NF, dh_N2F, dw_N
