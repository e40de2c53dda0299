"""GPU tests for linear_moe.model: fla's fused linear cross-entropy == plain loss; a tiny model trains in bf16."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.model import LinearMoEForCausalLM, get_preset
from linear_moe.model.loss import causal_lm_loss, fused_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_loss_equals_plain_loss():
    if not fused_available(torch.zeros(1, device="cuda")):
        pytest.skip("fla not installed")
    torch.manual_seed(0)
    h = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    w = (torch.randn(5000, 64, device="cuda") * 0.1).requires_grad_()
    labels = torch.randint(0, 5000, (2, 300), device="cuda")
    labels[0, :17] = -100
    fused, logits = causal_lm_loss(h, w, labels, fuse=True)
    assert logits is None
    g_fused = torch.autograd.grad(fused, (h, w))
    plain = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), ignore_index=-100)
    g_plain = torch.autograd.grad(plain, (h, w))
    # fla's Triton matmuls may run fp32 inputs in TF32 (10-bit mantissa): ~1e-3 relative on logits and gradients
    torch.testing.assert_close(fused, plain, atol=2e-3, rtol=1e-3)
    for a, b in zip(g_fused, g_plain, strict=True):
        assert (a - b).norm() / b.norm() < 1e-2


def test_model_fused_and_plain_loss_agree():
    if not fused_available(torch.zeros(1, device="cuda")):
        pytest.skip("fla not installed")
    torch.manual_seed(0)
    cfg = get_preset("debug-mixtral").replace(mixer="gla")
    model = LinearMoEForCausalLM(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 65), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = model(ids[:, :-1], labels=ids[:, 1:])
        model.cfg.fuse_linear_cross_entropy = False
        plain = model(ids[:, :-1], labels=ids[:, 1:])
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, atol=2e-2, rtol=1e-2)  # bf16 logits on the plain path


@pytest.mark.parametrize("preset", ["debug-dense", "debug-mixtral", "debug-deepseek-v3"])
@pytest.mark.parametrize("mixer", ["attention", "gla", "gated_deltanet"])
def test_tiny_model_trains_bf16(preset, mixer):
    torch.manual_seed(0)
    cfg = get_preset(preset).replace(mixer=mixer)
    model = LinearMoEForCausalLM(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (1, 4 * 64 + 1), device="cuda")
    cu = torch.tensor([0, 64, 160, 256], device="cuda", dtype=torch.int32)  # packed documents
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], labels=ids[:, 1:], cu_seqlens=cu)
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("mixer", ["gla", "gated_deltanet"])
def test_a03b_preset_forward_backward(mixer):
    """One bf16-autocast step of the full-size A0.3B-2B preset (vocab 32K, as the reference runs): the initial
    loss is that of a near-uniform prediction, every gradient is finite, and the expert loads count T*k tokens.
    Throughput and memory of the same step: `linear-moe bench model` (docs/benchmarks.md)."""
    torch.manual_seed(0)
    cfg = get_preset("A0.3B-2B").replace(mixer=mixer, vocab_size=32000)
    model = LinearMoEForCausalLM(cfg).cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 2049), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss + out.aux_loss).backward()
    assert abs(out.loss.item() - math.log(cfg.vocab_size)) < 0.5, out.loss.item()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, bad
    assert model.embed_tokens.weight.grad is not None and model.layers[-1].ffn.experts.w2.grad.abs().sum() > 0
    k = cfg.moe.top_k
    assert torch.equal(out.expert_load.sum(-1), torch.full_like(out.expert_load[:, 0], 2 * 2048 * k))
