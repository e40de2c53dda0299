"""fla's causal convolution and fused gated RMS norm (reached through `linear_moe.ops` on CUDA) against our PyTorch
path in float32 on the CPU: outputs and gradients, relative errors at bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from linear_moe.ops._dispatch import use_fla
from linear_moe.ops.activations import swiglu
from linear_moe.ops.conv import causal_conv1d
from linear_moe.ops.norm import rms_norm_gated

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def rel(a, b):
    return ((a.float().cpu() - b.float()).norm() / b.float().norm()).item()


def run_both(fn, leaves, **kw):
    """(cuda bf16 output, grads), (cpu float32 output, grads) of fn(**leaves) with one upstream gradient."""
    torch.manual_seed(0)
    gpu = {
        n: t.detach().cuda().to(torch.bfloat16 if t.dim() > 1 or n != "weight" else t.dtype).requires_grad_()
        for n, t in leaves.items()
    }
    cpu = {n: t.detach().float().requires_grad_() for n, t in leaves.items()}
    y_gpu, y_cpu = fn(**gpu, **kw), fn(**cpu, **{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()})
    dy = torch.randn_like(y_cpu)
    y_gpu.backward(dy.cuda().to(y_gpu.dtype))
    y_cpu.backward(dy)
    return (y_gpu, {n: t.grad for n, t in gpu.items()}), (y_cpu, {n: t.grad for n, t in cpu.items()})


@pytest.mark.parametrize("packed", [False, True])
def test_causal_conv1d_fla_matches_torch(packed):
    assert use_fla(torch.empty(1, device="cuda")), "fla must be importable on the GPU machine"
    torch.manual_seed(0)
    B, T, D, W = (1, 300, 256, 4) if packed else (2, 300, 256, 4)
    leaves = {"x": torch.randn(B, T, D), "weight": torch.randn(D, W) / 2}
    cu = torch.tensor([0, 37, 150, 300], dtype=torch.int32, device="cuda") if packed else None
    (y, g), (y_ref, g_ref) = run_both(causal_conv1d, leaves, activation="silu", cu_seqlens=cu)
    assert rel(y, y_ref) < 1e-2
    for n in leaves:
        assert rel(g[n], g_ref[n]) < 2e-2, n


@pytest.mark.parametrize("activation", ["swish", "sigmoid"])
def test_rms_norm_gated_fla_matches_torch(activation):
    torch.manual_seed(0)
    leaves = {"x": torch.randn(2, 300, 4, 128), "g": torch.randn(2, 300, 4, 128), "weight": 1 + torch.randn(128) / 4}
    (y, g), (y_ref, g_ref) = run_both(rms_norm_gated, leaves, eps=1e-5, activation=activation)
    assert rel(y, y_ref) < 1e-2
    for n in leaves:
        assert rel(g[n], g_ref[n]) < 2e-2, n


def test_swiglu_fla_matches_torch_on_strided_halves():
    """fla's fused SwiGLU reads the gate / up halves of one [N, 2F] projection as row-strided views."""
    torch.manual_seed(0)
    leaves = {"h": torch.randn(1000, 2 * 96)}

    def fn(h):
        gate, up = h.chunk(2, dim=-1)
        return swiglu(gate, up)

    (y, g), (y_ref, g_ref) = run_both(fn, leaves)
    assert rel(y, y_ref) < 1e-2
    assert rel(g["h"], g_ref["h"]) < 1e-2
