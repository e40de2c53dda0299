"""Every mixer in MIXERS in bfloat16 on CUDA: forward and backward run, and fla's kernels agree with our PyTorch
ops (`LINEAR_MOE_KERNELS=torch`) on the same module: outputs, input gradients, packed documents with states,
and prefill + step-by-step decoding (fla's fused_recurrent kernels reading states written by its chunk kernels).
"""

from __future__ import annotations

import pytest
import torch

from linear_moe.mixers import MIXERS, MixerContext, build_mixer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D, H = 256, 4  # head dim 64, as in real models
NAMES = list(MIXERS)
BF16_RTOL = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(name: str, layer_idx: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_mixer(name, D, H, layer_idx=layer_idx)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.cuda().to(torch.bfloat16)


def both_paths(monkeypatch, fn):
    """fn() with fla's kernels, then with the PyTorch ops."""
    monkeypatch.setenv("LINEAR_MOE_KERNELS", "auto")
    out_fla = fn()
    monkeypatch.setenv("LINEAR_MOE_KERNELS", "torch")
    return out_fla, fn()


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_fla_matches_torch(name, monkeypatch):
    m = build(name).train()
    first = build(name, layer_idx=0).train()
    x = torch.randn(2, 200, D, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)

    def run():
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        context = MixerContext()  # cross-layer inputs (RWKV-7's v_first) from a layer-0 twin
        first(xi, context=context)
        y, _ = m(xi, context=context)
        y.backward(gy)
        grads = {n: p.grad.float().clone() for n, p in m.named_parameters()}
        return y.detach(), xi.grad, grads

    (y_f, gx_f, gp_f), (y_t, gx_t, gp_t) = both_paths(monkeypatch, run)
    assert torch.isfinite(y_f).all() and torch.isfinite(gx_f).all()
    assert all(torch.isfinite(g).all() for g in gp_f.values())
    assert rel_err(y_f, y_t) < BF16_RTOL, f"{name}: output rel err {rel_err(y_f, y_t):.3g}"
    assert rel_err(gx_f, gx_t) < 3 * BF16_RTOL, f"{name}: input grad rel err {rel_err(gx_f, gx_t):.3g}"
    worst = max(gp_f, key=lambda n: rel_err(gp_f[n], gp_t[n]))
    assert rel_err(gp_f[worst], gp_t[worst]) < 5 * BF16_RTOL, (
        f"{name}: grad of {worst} rel err {rel_err(gp_f[worst], gp_t[worst]):.3g} (output "
        f"{rel_err(y_f, y_t):.3g}, input grad {rel_err(gx_f, gx_t):.3g})"
    )


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_packed_documents_with_state_fla_matches_torch(name, monkeypatch):
    m = build(name).train()
    x = torch.randn(1, 230, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 70, 71, 230], device="cuda", dtype=torch.int32)

    def run():
        y1, s = m(x[:, :230], cu_seqlens=cu, use_cache=True)
        y2, _ = m(x[:, :230], state=s, cu_seqlens=cu)  # every document continues from its own state
        return y1, y2

    (y1_f, y2_f), (y1_t, y2_t) = both_paths(monkeypatch, run)
    assert rel_err(y1_f, y1_t) < BF16_RTOL and rel_err(y2_f, y2_t) < BF16_RTOL


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_then_decoding_fla_matches_torch(name, monkeypatch):
    m = build(name).eval()
    x = torch.randn(2, 100, D, device="cuda", dtype=torch.bfloat16)

    def run():
        ys, s = [], None
        y, s = m(x[:, :96], use_cache=True)
        ys.append(y)
        for t in range(96, 100):
            y, s = m(x[:, t : t + 1], state=s)
            ys.append(y)
        return torch.cat(ys, 1)

    y_f, y_t = both_paths(monkeypatch, run)
    y_full = m(x)[0]
    assert rel_err(y_f, y_t) < BF16_RTOL, f"{name}: decoding rel err {rel_err(y_f, y_t):.3g}"
    assert rel_err(y_f, y_full) < BF16_RTOL, f"{name}: decoding vs full forward {rel_err(y_f, y_full):.3g}"


FLA_LAYERS = {  # our name: (fla module, class, fla kwargs) -- same defaults, same parameter names
    "retnet": ("multiscale_retention", "MultiScaleRetention", dict(num_heads=H, layer_idx=0)),
    "gla": ("gla", "GatedLinearAttention", dict(num_heads=H, layer_idx=0)),
    "based": ("based", "BasedLinearAttention", dict(num_heads=H, num_key_value_heads=H)),  # no layer_idx in fla
    "rebased": ("rebased", "ReBasedLinearAttention", dict(num_heads=H, num_key_value_heads=H, layer_idx=0)),
    "linear_attn": ("linear_attn", "LinearAttention", dict(num_heads=H, layer_idx=0)),
}


@pytest.mark.parametrize("name", list(FLA_LAYERS))
@torch.no_grad()
def test_matches_fla_layer_with_copied_weights(name):
    module, cls, fla_kwargs = FLA_LAYERS[name]
    fla_layers = pytest.importorskip(f"fla.layers.{module}")
    torch.manual_seed(0)
    ours = build_mixer(name, D, H).cuda()
    for p in ours.parameters():
        p.add_(0.05 * torch.randn_like(p))
    ref = getattr(fla_layers, cls)(hidden_size=D, **fla_kwargs).cuda()
    ref_params, ours_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert set(ours_params) == set(ref_params), f"names differ: {set(ours_params) ^ set(ref_params)}"
    for k, p in ours_params.items():
        ref_params[k].copy_(p.reshape(ref_params[k].shape))
    x = torch.randn(2, 100, D, device="cuda")
    out = ref(x)
    y_ref = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours(x)[0], y_ref, atol=5e-3 * y_ref.abs().max().item(), rtol=1e-2)
