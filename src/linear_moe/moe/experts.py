"""Experts: the dense SwiGLU MLP (shared experts, dense layers) and E routed SwiGLU experts as grouped GEMMs."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from linear_moe.layers.mlp import SwiGLU
from linear_moe.ops.activations import swiglu

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


def grouped_matmul(
    x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Rows of x sorted by group, group e = the next counts_E[e] rows: out[rows of e] = x[rows of e] @ w[e].

    backend "grouped_mm": one `torch._grouped_mm` (offsets = int32 cumulative counts; group sizes need no
    alignment since torch 2.8, pytorch#155466); "bmm": pad every group to the largest count and run one bmm
    (loop-free fallback for other dtypes/devices); "auto": grouped_mm when supported, else bmm.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped matmul backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "grouped_mm" or (backend == "auto" and grouped_mm_supported(x_NK, w_EKM)):
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_NK.contiguous(), w_EKM, offs=offs_E)
    return _padded_bmm(x_NK, w_EKM, counts_E)


def _padded_bmm(x_NK: torch.Tensor, w_EKM: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    E, N = w_EKM.shape[0], x_NK.shape[0]
    if N == 0:
        return x_NK.new_zeros(0, w_EKM.shape[-1])
    group_N = torch.repeat_interleave(torch.arange(E, device=x_NK.device), counts_E, output_size=N)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_N = torch.arange(N, device=x_NK.device) - starts_E[group_N]
    # the largest group, read on the host; while a CUDA graph is captured (decode steps) no host read is allowed,
    # so every group gets room for all N rows (N is a few tokens x top-k there)
    capturing = x_NK.is_cuda and torch.cuda.is_current_stream_capturing()
    capacity = N if capturing else int(counts_E.max())
    buf_ECK = x_NK.new_zeros(E, capacity, x_NK.shape[1]).index_put((group_N, rank_N), x_NK)
    return torch.bmm(buf_ECK, w_EKM)[group_N, rank_N]


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

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by expert (counts_E rows each) -> [N, D], in the autocast dtype when autocast is on
        (autocast does not cover `_grouped_mm` / `bmm` on float32 weights by itself)."""
        dtype = x_ND.dtype
        if torch.is_autocast_enabled(x_ND.device.type):
            dtype = torch.get_autocast_dtype(x_ND.device.type)
        x_ND = x_ND.to(dtype)
        h_N2F = grouped_matmul(x_ND, local(self.w13).to(dtype), counts_E, self.backend)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        return grouped_matmul(swiglu(gate_NF, up_NF), local(self.w2).to(dtype), counts_E, self.backend)
