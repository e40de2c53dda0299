"""GPU tests for linear_moe.moe: torch._grouped_mm (CUDA bf16) == a per-expert loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.moe import MoELayer, grouped_matmul, moe_preset
from linear_moe.moe.experts import GroupedExperts, grouped_mm_supported

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

E, K, D, FF = 64, 8, 1024, 896


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def routed_counts(num_tokens: int, seed: int = 0) -> torch.Tensor:
    """Expert counts of a random top-8 routing (uneven, not multiples of 16)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    experts_TK = torch.randn(num_tokens, E, device="cuda", generator=g).topk(K, dim=-1).indices
    return torch.bincount(experts_TK.reshape(-1), minlength=E)


def loop_experts(x_ND, w13, w2, counts_E):
    """Per-expert Python loop in float32 on the same bf16 values."""
    out, start = [], 0
    for e, c in enumerate(counts_E.tolist()):
        h = x_ND[start : start + c].float() @ w13[e].float()
        out.append((F.silu(h[:, :FF]) * h[:, FF:]) @ w2[e].float())
        start += c
    return torch.cat(out)


def test_grouped_mm_available():
    x = torch.zeros(16, D, device="cuda", dtype=torch.bfloat16)
    assert grouped_mm_supported(x, torch.zeros(E, D, FF, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("empty", [False, True], ids=["routed", "empty-experts"])
def test_grouped_matmul_bf16_matches_loop(empty):
    """Also with experts that get no tokens (their weight gradient must be exactly zero)."""
    torch.manual_seed(0)
    counts_E = routed_counts(512)
    if empty:
        counts_E[[0, 7, 63]] = 0
    N = int(counts_E.sum())
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(E, D, FF, device="cuda")).bfloat16().requires_grad_()
    y = grouped_matmul(x, w, counts_E, backend="grouped_mm")
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref, start = [], 0
    for e, c in enumerate(counts_E.tolist()):
        ref.append(xf[start : start + c] @ wf[e])
        start += c
    ref = torch.cat(ref)
    assert rel_err(y, ref) < 1e-2
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, w), g.bfloat16())
    rx, rw = torch.autograd.grad(ref, (xf, wf), g)
    assert rel_err(gx, rx) < 1e-2 and rel_err(gw, rw) < 1e-2
    if empty:
        assert gw[[0, 7, 63]].abs().sum() == 0


def test_grouped_experts_bf16_matches_loop_fwd_bwd():
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, FF).cuda().bfloat16()
    torch.nn.init.normal_(experts.w13, std=0.02)
    torch.nn.init.normal_(experts.w2, std=0.02)
    counts_E = routed_counts(1024, seed=1)
    x = torch.randn(int(counts_E.sum()), D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = experts(x, counts_E)
    w13 = experts.w13.detach().float().requires_grad_()
    w2 = experts.w2.detach().float().requires_grad_()
    xf = x.detach().float().requires_grad_()
    ref = loop_experts(xf, w13, w2, counts_E)
    assert rel_err(y, ref) < 1e-2
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, experts.w13, experts.w2), g.bfloat16())
    want = torch.autograd.grad(ref, (xf, w13, w2), g)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_layer_bf16_cuda_matches_bmm_path(family):
    """The whole layer in bf16 on CUDA: grouped_mm path == the padded-bmm fallback on the same weights."""
    torch.manual_seed(0)
    cfg = moe_preset(family, num_experts=E, top_k=K, expert_ffn_hidden_size=FF // 4)
    fast = MoELayer(cfg, 256).cuda().bfloat16()
    slow = MoELayer(cfg, 256, backend="bmm").cuda().bfloat16()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16)
    (y1, aux1), (y2, aux2) = fast(x), slow(x)
    assert rel_err(y1, y2) < 1e-2
    torch.testing.assert_close(aux1.load, aux2.load)


def test_layer_fp32_params_under_bf16_autocast():
    """The trainer's setup: float32 parameters, bf16 autocast. Experts take the grouped_mm bf16 path."""
    torch.manual_seed(0)
    layer = MoELayer(moe_preset("deepseek_v3", num_experts=E, top_k=K, expert_ffn_hidden_size=FF // 4), 256).cuda()
    x = torch.randn(2, 128, 256, device="cuda")
    ref, _ = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 1e-2
    (y.float().square().mean() + aux.loss).backward()
    assert torch.isfinite(layer.experts.w13.grad).all() and layer.router.weight.grad.dtype == torch.float32
