"""`linear-moe bench kernel`: forward + backward time of the `chunk_<family>` ops against sequence length.

Each family runs at `[B, T, H, K]` / `[B, T, H, V]` with B = tokens // T (a constant number of tokens per call, so
tokens/s compares sequence lengths fairly), inputs in bf16 on CUDA (fla's Triton kernels) and float32 on CPU (our
PyTorch chunked form, a smoke test). Softmax attention (`F.scaled_dot_product_attention`, causal, the op our
attention mixer runs) at the same shape is the baseline, measured in the same run unless `--no-baseline`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from linear_moe.bench.report import Report
from linear_moe.bench.timer import resolve_device
from linear_moe.ops.autotune import limit_autotune

Tensor = torch.Tensor
BASELINE = "attention"


def _inputs(
    family: str, B: int, T: int, H: int, K: int, V: int, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict[str, Tensor | float]]:
    """(leaves that get gradients, other arguments) of `chunk_<family>`: gates as log decays in (-1, 0),
    l2-normalised keys for the delta rules, positive feature maps for linear attention."""

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=torch.float32)

    def log_decay(*shape: int) -> Tensor:
        return F.logsigmoid(rnd(*shape) + 4.0)  # mostly in (-0.1, 0): long memory, as trained gates

    if family == "hgrn":
        return {"x": rnd(B, T, H * K), "g": log_decay(B, T, H * K)}, {}
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K), rnd(B, T, H, V)
    if family == "gla":
        return {"q": q, "k": k, "v": v, "g": log_decay(B, T, H, K)}, {}
    if family == "simple_gla":
        return {"q": q, "k": k, "v": v, "g": log_decay(B, T, H)}, {}
    if family == "linear_attn":
        return {"q": q.sigmoid(), "k": k.sigmoid(), "v": v}, {}
    if family in ("delta_rule", "gated_delta_rule"):
        x = {"q": F.normalize(q, dim=-1), "k": F.normalize(k, dim=-1), "v": v, "beta": torch.rand_like(q[..., 0])}
        if family == "gated_delta_rule":
            x["g"] = log_decay(B, T, H)
        return x, {}
    if family == "rwkv6":
        return {"r": q, "k": k, "v": v, "w": log_decay(B, T, H, K)}, {"u": rnd(H, K)}
    if family == "rwkv7":
        kk = F.normalize(rnd(B, T, H, K), dim=-1)
        return {"r": q, "w": log_decay(B, T, H, K), "k": k, "v": v, "a": -kk, "b": kk * torch.rand_like(kk)}, {}
    raise ValueError(f"unknown kernel family {family!r}; valid: {', '.join(FAMILIES)}, {BASELINE}")


FAMILIES = ("gla", "simple_gla", "gated_delta_rule", "delta_rule", "linear_attn", "hgrn", "rwkv6", "rwkv7")


def kernel_call(
    family: str, B: int, T: int, H: int, K: int, V: int, device: torch.device, dtype: torch.dtype
) -> tuple[Callable[..., Tensor], dict[str, Tensor], dict[str, Tensor | float]]:
    """(op returning the output, leaves that get gradients, other arguments) of `chunk_<family>`, or of causal SDPA
    on [B, H, T, D] for `attention`, on random inputs of dtype `dtype`."""
    if family == BASELINE:
        leaves = {n: torch.randn(B, H, T, d, device=device) for n, d in (("q", K), ("k", K), ("v", V))}
        other: dict = {}

        def op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    else:
        leaves, other = _inputs(family, B, T, H, K, V, device, dtype)
        chunk = getattr(importlib.import_module(f"linear_moe.ops.{family}"), f"chunk_{family}")

        def op(**x: Tensor) -> Tensor:
            return chunk(**x)[0]

    leaves = {n: t.to(dtype).requires_grad_() for n, t in leaves.items()}
    other = {n: t.to(dtype) if isinstance(t, Tensor) else t for n, t in other.items()}
    return op, leaves, other


def kernel_step(
    family: str, B: int, T: int, H: int, K: int, V: int, device: torch.device, dtype: torch.dtype
) -> Callable[[], None]:
    """One forward + backward of `kernel_call(...)`'s op, gradients dropped after each call."""
    op, leaves, other = kernel_call(family, B, T, H, K, V, device, dtype)
    grad_out = torch.randn_like(op(**leaves, **other))

    def step() -> None:
        op(**leaves, **other).backward(grad_out)
        for t in leaves.values():
            t.grad = None

    return step


def run(args: argparse.Namespace) -> Report:
    device = resolve_device(args.device)
    limit_autotune(args.autotune)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = list(args.family) + ([] if args.no_baseline or BASELINE in args.family else [BASELINE])
    for name in names:
        if name not in FAMILIES and name != BASELINE:
            raise ValueError(f"unknown kernel family {name!r}; valid: {', '.join(FAMILIES)}, {BASELINE}")
    H, K, V = args.heads, args.key_dim, args.value_dim
    report = Report("kernel", args.out, {"dtype": str(dtype), **vars(args)})
    print(f"chunk ops fwd+bwd, H={H} K={K} V={V} {dtype}, {args.tokens:,} tokens per call, autotune={args.autotune}")
    for name in names:
        for T in args.seq_len:
            B = max(1, args.tokens // T)
            step = partial(kernel_step, name, B, T, H, K, V, device, dtype)
            report.measure(name, B, T, step, device, args.steps, args.warmup)
    report.finish(plot=not args.no_plot, title=f"chunk ops fwd+bwd, H={H} K={K} V={V}")
    return report
