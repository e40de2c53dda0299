"""Parity of our recurrent mixers with fla 0.6.0's layers of the same method: same weights (copied by name,
reshaped where fla's Conv1d keeps a singleton dim; Mamba2's through `fused_state_dict`), same input -> same output,
on CUDA."""

from __future__ import annotations

import pytest
import torch

from linear_moe.mixers import build_mixer
from linear_moe.mixers.mamba2 import fused_state_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

D, H = 128, 2
CASES = {  # name: (fla module, class, fla kwargs, our kwargs)
    "deltanet": ("delta_net", "DeltaNet", dict(num_heads=H, use_gate=True), dict(use_gate=True)),
    "gated_deltanet": ("gated_deltanet", "GatedDeltaNet", dict(num_heads=H, head_dim=D // H, expand_v=2.0), {}),
    "mamba2": ("mamba2", "Mamba2", dict(num_heads=H, head_dim=2 * D // H, state_size=16), dict(state_size=16)),
    "rwkv6": ("rwkv6", "RWKV6Attention", dict(num_heads=H), {}),
    "rwkv7": ("rwkv7", "RWKV7Attention", dict(num_heads=H, head_dim=None, num_hidden_layers=2), {}),
    "hgrn": ("hgrn", "HGRNAttention", {}, {}),
    "hgrn2": ("hgrn2", "HGRN2Attention", dict(num_heads=H, expand_ratio=D // H), {}),
}
# our weights -> fla's names and layout (Mamba2: separate z/x/B/C/dt projections and x/B/C convs -> fused in_proj,
# conv1d); the others share fla's names
ADAPTERS = {"mamba2": fused_state_dict}
# fla's chunk_delta_rule rejects float32 ("does not support float32. Please use bfloat16."): compare in bf16
BF16_ONLY = {"deltanet": torch.bfloat16}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_fla_layer(name):
    compare_with_fla(name, *CASES[name])


def test_gated_deltanet_gva_matches_fla_layer():
    """Grouped value heads: 2H value heads over H q/k heads, per-value-head gates."""
    compare_with_fla(
        "gated_deltanet",
        "gated_deltanet",
        "GatedDeltaNet",
        dict(num_heads=H, num_v_heads=2 * H, head_dim=D // H, expand_v=1.0),
        dict(num_v_heads=2 * H, expand_v=1.0),
    )


def compare_with_fla(name, module, cls, fla_kwargs, ours_kwargs):
    fla_layers = pytest.importorskip(f"fla.layers.{module}")
    torch.manual_seed(0)
    ours = build_mixer(name, D, H, layer_idx=0, **ours_kwargs).cuda()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = getattr(fla_layers, cls)(hidden_size=D, layer_idx=0, **fla_kwargs).cuda()
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        ours_params = ADAPTERS.get(name, dict)(dict(ours.named_parameters()))
        assert set(ours_params) <= set(ref_params), f"names fla lacks: {set(ours_params) - set(ref_params)}"
        for k, p in ours_params.items():
            ref_params[k].copy_(p.reshape(ref_params[k].shape))
    dtype = BF16_ONLY.get(name, torch.float32)
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = torch.randn(2, 100, D, device="cuda", dtype=dtype)  # > 64 tokens: fla runs its chunk kernels
    y = ours(x)[0].float()
    y_ref = ref(x)[0].float()
    if dtype == torch.float32:
        torch.testing.assert_close(y, y_ref, atol=5e-3 * y_ref.abs().max().item(), rtol=1e-2)
    else:  # same bf16 kernels on both sides; the layers differ only in op order around them
        assert ((y - y_ref).norm() / y_ref.norm()).item() < 1e-2
