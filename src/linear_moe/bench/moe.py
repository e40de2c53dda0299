"""`linear-moe bench moe`: the grouped SwiGLU experts alone, the whole `MoELayer`, and the token gather + combine
alone, forward + backward.

Default shape: E=64 experts, top-8, D=1024, F=896, 65,536 tokens (random top-8 routing), bf16 on CUDA. Expert FLOPs
per assignment: forward 2*D*2F + 2*F*D = 6*D*F, backward twice that (18*D*F fwd+bwd), reported as TFLOP/s. The
`MoELayer` row adds the router, dispatch and combine (no shared expert); the `gather+combine` row is the row
movement alone (`gather_rows` and `combine` of moe/dispatch.py, no experts), what the Triton kernels of
moe/kernels.py replace: compare a run with `LINEAR_MOE_MOE_KERNELS=0` (PyTorch) against one without (kernels).
`--capacity-factor` drops assignments in the last two rows (the kernels' dropping path).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch

from linear_moe.bench.report import Record, Report
from linear_moe.bench.timer import resolve_device
from linear_moe.moe import MoELayer, kernels, moe_preset
from linear_moe.moe.dispatch import combine, dispatch, gather_rows
from linear_moe.moe.experts import GroupedExperts
from linear_moe.ops.autotune import limit_autotune


def experts_step(E: int, k: int, D: int, F: int, T: int, backend: str, device, dtype) -> Callable[[], None]:
    """fwd + bwd of `GroupedExperts` on T*k rows grouped by a random top-k routing of T tokens."""
    experts = GroupedExperts(E, D, F, backend=backend).to(device, dtype)
    torch.nn.init.normal_(experts.w13, std=0.02)
    torch.nn.init.normal_(experts.w2, std=0.02)
    experts_TK = torch.randn(T, E, device=device).topk(k, dim=-1).indices
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    x_ND = torch.randn(T * k, D, device=device, dtype=dtype, requires_grad=True)
    g_ND = torch.randn(T * k, D, device=device, dtype=dtype)
    return lambda: experts(x_ND, counts_E).backward(g_ND)


def layer_step(
    E: int, k: int, D: int, F: int, T: int, backend: str, capacity_factor: float | None, device, dtype
) -> Callable[[], None]:
    """fwd + bwd of a whole `MoELayer` (router, dispatch, experts, combine) on [1, T, D]."""
    cfg = moe_preset("mixtral", num_experts=E, top_k=k, expert_ffn_hidden_size=F, capacity_factor=capacity_factor)
    layer = MoELayer(cfg, D, backend)
    layer = layer.to(device, dtype)
    x_BTD = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=True)

    def step() -> None:
        y, aux = layer(x_BTD)
        (y.float().square().mean() + aux.loss).backward()

    return step


def combine_step(E: int, k: int, D: int, T: int, capacity_factor: float | None, device, dtype) -> Callable[[], None]:
    """fwd + bwd of the token gather and the weighted combine alone (a random top-k routing of T tokens): the
    gradients of x and of the float32 router weights."""
    experts_TK = torch.randn(T, E, device=device).topk(k, dim=-1).indices
    weights_TK = torch.rand(T, k, device=device).softmax(-1).requires_grad_()
    d = dispatch(experts_TK, weights_TK.detach(), E, capacity_factor)
    x_TD = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    g_TD = torch.randn(T, D, device=device, dtype=dtype)
    return lambda: combine(gather_rows(x_TD, d), d, weights_TK).backward(g_TD)


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    E, k, D, F, T = args.experts, args.top_k, args.hidden, args.ffn, args.tokens
    on = kernels.use_moe_kernels(torch.empty(0, device=device))
    report = Report("moe", args.out, {**vars(args), "moe_kernels": on})
    print(f"MoE fwd+bwd E={E} top-{k} D={D} F={F} tokens={T} backend={args.backend} {dtype}")
    print(f"gather/combine: {'Triton kernels' if on else 'PyTorch'} (LINEAR_MOE_MOE_KERNELS=0: PyTorch)")
    flops = 18.0 * T * k * D * F

    def tflops(record: Record) -> float:
        return flops * record.steps / record.seconds / 1e12

    cf, torch_path = args.capacity_factor, "" if on else " (PyTorch combine)"  # merged reports keep both lines
    rows = {
        "grouped experts": (partial(experts_step, E, k, D, F, T, args.backend, device, dtype), tflops),
        f"MoELayer{torch_path}": (partial(layer_step, E, k, D, F, T, args.backend, cf, device, dtype), tflops),
        f"gather+combine{torch_path}": (partial(combine_step, E, k, D, T, cf, device, dtype), None),
    }
    for name, (step, flops_of) in rows.items():
        extra = {"ms_per_step": lambda r: r.ms_per_step}
        if flops_of is not None:
            extra["expert_TFLOP/s"] = flops_of
        report.measure(name, 1, T, step, device, args.steps, args.warmup, extra=extra)
    report.finish(plot=not args.no_plot, title=f"MoE fwd+bwd, E={E} top-{k} D={D} F={F}")
    return report
