"""Experts: the dense SwiGLU MLP (shared experts, dense layers) and E routed SwiGLU experts as grouped GEMMs."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from linear_moe.layers.mlp import SwiGLU
from linear_moe.moe import kernels

MLP = SwiGLU

BACKENDS = ("auto", "grouped_mm", "bmm")


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm reads operands with TMA: every non-unit stride must be a multiple of 16 bytes."""
    return all(s == 1 or (s * t.element_size()) % 16 == 0 for s in t.stride())


def grouped_mm_supported(x_NK: torch.Tensor, w_EKM: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run these operands: CUDA bf16 (SM >= 80), or CPU float32 (torch >= 2.13),
    with 16-byte aligned strides. Not CPU float32 under torch.compile (the fake kernel accepts only bf16)."""
    if not hasattr(torch, "_grouped_mm") or x_NK.dtype != w_EKM.dtype:
        return False
    if x_NK.is_cuda:
        ok_dtype = x_NK.dtype == torch.bfloat16
    else:
        ok_dtype = x_NK.dtype == torch.float32 and not torch.compiler.is_compiling()
    return ok_dtype and _aligned(x_NK) and _aligned(w_EKM)


def _use_grouped_mm(a: torch.Tensor, b: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped matmul backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend == "grouped_mm" or (backend == "auto" and grouped_mm_supported(a, b))


def grouped_matmul(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Rows of x sorted by group, group e = the next counts_E[e] rows: out[rows of e] = x[rows of e] @ w[e].

    backend "grouped_mm": one `torch._grouped_mm` (offsets = int32 cumulative counts; group sizes need no
    alignment since torch 2.8, pytorch#155466); "bmm": pad every group to the largest count and run one bmm
    (loop-free fallback for other dtypes/devices); "auto": grouped_mm when supported, else bmm.
    """
    if _use_grouped_mm(x_NK, w_EKM, backend):
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_NK.contiguous(), w_EKM, offs=offs_E)
    if x_NK.shape[0] == 0:
        return x_NK.new_zeros(0, w_EKM.shape[-1])
    buf_ECK, group_N, rank_N = _padded(x_NK, counts_E)
    return torch.bmm(buf_ECK, w_EKM)[group_N, rank_N]


def grouped_matmul_wgrad(
    x_NK: torch.Tensor, g_NM: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """[E, K, M]: x[rows of e]^T @ g[rows of e] for each group e (zero for an empty group), the weight gradient of
    `grouped_matmul(x, w, counts_E)` for the output gradient g. grouped_mm: one `torch._grouped_mm` of x^T and g
    grouped along the rows (what autograd runs for it); bmm: both padded to the largest group."""
    if _use_grouped_mm(x_NK, g_NM.unsqueeze(0), backend):
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_NK.contiguous().t(), g_NM.contiguous(), offs=offs_E)
    E = counts_E.shape[0]
    if x_NK.shape[0] == 0:
        return x_NK.new_zeros(E, x_NK.shape[1], g_NM.shape[1])
    x_ECK, group_N, rank_N = _padded(x_NK, counts_E)
    g_ECM = g_NM.new_zeros(*x_ECK.shape[:2], g_NM.shape[1]).index_put((group_N, rank_N), g_NM)
    return torch.bmm(x_ECK.mT, g_ECM)


def _padded(x_NK: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buf [E, C, K] zero-padded groups, group of each row, its place in the group); C = the largest count."""
    E, N = counts_E.shape[0], x_NK.shape[0]
    group_N = torch.repeat_interleave(torch.arange(E, device=x_NK.device), counts_E, output_size=N)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(N, device=x_NK.device) - starts_E[group_N]
    # the largest group, read on the host; while a CUDA graph is captured (decode steps) no host read is allowed,
    # so every group gets room for all N rows (N is a few tokens x top-k there)
    capturing = x_NK.is_cuda and torch.cuda.is_current_stream_capturing()
    capacity = N if capturing else int(counts_E.max())
    buf_ECK = x_NK.new_zeros(E, capacity, x_NK.shape[1]).index_put((group_N, rank_N), x_NK)
    return buf_ECK, group_N, rank_N


class _RoutedSwiGLU(torch.autograd.Function):
    """y = (silu(gate) * up * weight) @ w2[e], gate | up = x @ w13[e], for the rows of each expert e, keeping for
    backward only the [N, 2F] gate | up output h (and the rows' source; see `GroupedExperts.forward`).

    Autograd's own graph of the same ops keeps h, the SwiGLU output a [N, F] (the second GEMM's input) and the
    rows x [N, D] (the first GEMM's input); with the router weights applied by the combine, it also keeps the
    expert output [N, D] for their gradient. Here a is recomputed in the backward's one pass over h (which the
    SwiGLU backward reads anyway: `kernels.routed_swiglu_backward`), the weights' gradient comes out of that same
    pass (dw = sum_f da * silu(gate) * up), and x is gathered again from its [T, D] source when one is given. At
    A0.3B-2B's shape (65,536 tokens, top-8) that is 2.7 GiB a layer less, for one row gather more.
    """

    @staticmethod
    def forward(ctx, x_ND, w13_EDH, w2_EFD, counts_E, weights_N, source_TD, token_N, backend: str):
        # the weights are cast to x's dtype here and again in backward: their bf16 copies of float32 master weights
        # (a third of the weights' size) are not kept between the two
        dtype = x_ND.dtype
        h_N2F = grouped_matmul(x_ND, w13_EDH.to(dtype), counts_E, backend)
        y_ND = grouped_matmul(kernels.routed_swiglu(h_N2F, weights_N), w2_EFD.to(dtype), counts_E, backend)
        kept = (source_TD, token_N) if source_TD is not None else (x_ND, None)
        ctx.save_for_backward(*kept, w13_EDH, w2_EFD, counts_E, weights_N, h_N2F)
        ctx.backend = backend
        return y_ND

    @staticmethod
    def backward(ctx, dy_ND: torch.Tensor):
        x_ND, token_N, w13, w2, counts_E, weights_N, h_N2F = ctx.saved_tensors
        backend, dtype, dy_ND = ctx.backend, h_N2F.dtype, dy_ND.contiguous()
        if token_N is not None:
            x_ND = x_ND.index_select(0, token_N).to(dtype)
        da_NF = grouped_matmul(dy_ND, w2.to(dtype).mT, counts_E, backend)
        need_dw = weights_N is not None and ctx.needs_input_grad[4]
        a_NF, dh_N2F, dweights_N = kernels.routed_swiglu_backward(h_N2F, weights_N, da_NF, need_dw)
        del da_NF, h_N2F
        dw2 = grouped_matmul_wgrad(a_NF, dy_ND, counts_E, backend).to(w2.dtype) if ctx.needs_input_grad[2] else None
        dw13 = grouped_matmul_wgrad(x_ND, dh_N2F, counts_E, backend).to(w13.dtype) if ctx.needs_input_grad[1] else None
        dx = grouped_matmul(dh_N2F, w13.to(dtype).mT, counts_E, backend) if ctx.needs_input_grad[0] else None
        return dx, dw13, dw2, None, dweights_N, None, None, None


def local(w: torch.Tensor) -> torch.Tensor:
    """This rank's block of a weight split over expert-parallel ranks (a DTensor), else the weight itself."""
    return w.to_local() if isinstance(w, DTensor) else w


class GroupedExperts(nn.Module):
    """E SwiGLU experts as grouped GEMMs: w13 [E, D, 2F] (gate | up fused), w2 [E, F, D]. Under expert
    parallelism both are DTensors split on dim 0 and the forward runs this rank's E/ep experts."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.w13 = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * ffn_hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))

    def forward(
        self,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        weights_N: torch.Tensor | None = None,
        source: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [N, D] sorted by expert (counts_E rows each) -> [N, D], in the autocast dtype when autocast is on
        (autocast does not cover `_grouped_mm` / `bmm` on float32 weights by itself).

        weights_N [N]: the router weight of each row, applied to the SwiGLU output (the rows come out weighted,
        and the combine only sums them). source (x_TD, token_N): x is x_TD[token_N] (the local dispatcher's
        gather), so backward gathers it again instead of keeping the [N, D] rows (`_RoutedSwiGLU`)."""
        dtype = x_ND.dtype
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
        source_TD, token_N = source if source is not None else (None, None)
        w13, w2 = local(self.w13), local(self.w2)
        return _RoutedSwiGLU.apply(x_ND.to(dtype), w13, w2, counts_E, weights_N, source_TD, token_N, self.backend)
