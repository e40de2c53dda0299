"""Tests for linear_moe.model: config, causal LM, presets, counts."""

from __future__ import annotations

import pytest
import torch

from linear_moe.model import LinearMoEForCausalLM, ModelConfig, get_preset


def test_config_round_trip():
    cfg = get_preset("debug-dense").replace(layer_pattern="LN", mixer_kwargs={"qkv_bias": True})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="valid"):
        ModelConfig.from_dict({"hidden": 3})


def test_dense_attention_trains():
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(get_preset("debug-dense"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 512, (2, 17))
    losses = []
    for _ in range(8):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
