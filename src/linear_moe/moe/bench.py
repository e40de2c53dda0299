"""Time the grouped SwiGLU experts (fwd + bwd) on CUDA: `python -m linear_moe.moe.bench [--tokens N ...]`.

Default shape: E=64 experts, top-8, D=1024, F=896, 65,536 tokens (random top-8 routing). Expert FLOPs per
assignment: forward 2*D*2F + 2*F*D = 6*D*F, backward twice that (18*D*F fwd+bwd). Also times the whole
`MoELayer` (router, dispatch, experts, combine; no shared expert) for comparison.
"""

from __future__ import annotations

import argparse

import torch

from linear_moe.moe import MoELayer, moe_preset
from linear_moe.moe.experts import GroupedExperts


def cuda_time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Mean milliseconds per call of `fn` measured with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="linear-moe bench moe", description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=896)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--backend", default="auto", choices=["auto", "grouped_mm", "bmm"])
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: the MoE bench needs a CUDA GPU (torch.cuda.is_available() is False)")
    dev, dt = "cuda", torch.bfloat16
    E, k, D, F, T = a.experts, a.top_k, a.hidden, a.ffn, a.tokens
    experts = GroupedExperts(E, D, F, backend=a.backend).to(dev, dt)
    torch.nn.init.normal_(experts.w13, std=0.02)
    torch.nn.init.normal_(experts.w2, std=0.02)
    experts_TK = torch.randn(T, E, device=dev).topk(k, dim=-1).indices
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    x_ND = torch.randn(T * k, D, device=dev, dtype=dt, requires_grad=True)
    g_ND = torch.randn(T * k, D, device=dev, dtype=dt)

    def gemm_step():
        experts(x_ND, counts_E).backward(g_ND)

    ms = cuda_time_ms(gemm_step)
    flops = 18.0 * T * k * D * F
    print(
        f"grouped experts fwd+bwd E={E} top-{k} D={D} F={F} tokens={T} ({a.backend}): "
        f"{ms:.2f} ms, {flops / ms / 1e9:.1f} TFLOP/s"
    )

    layer = MoELayer(moe_preset("mixtral", num_experts=E, top_k=k, expert_ffn_hidden_size=F), D, a.backend).to(dev, dt)
    x_BTD = torch.randn(1, T, D, device=dev, dtype=dt, requires_grad=True)

    def layer_step():
        y, aux = layer(x_BTD)
        (y.float().square().mean() + aux.loss).backward()

    ms = cuda_time_ms(layer_step)
    print(
        f"MoELayer fwd+bwd (router + dispatch + experts + combine): {ms:.2f} ms, "
        f"{flops / ms / 1e9:.1f} expert TFLOP/s, peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )


if __name__ == "__main__":
    main()
