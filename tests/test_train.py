"""Trainer pieces: schedules against hand values, optimizer groups."""

from __future__ import annotations

import math

import pytest
from torch import nn

from linear_moe.train.optim import param_groups
from linear_moe.train.schedule import lr_at


def test_cosine_schedule_hand_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, total=7, schedule="cosine")
    # warmup 0.5, 1.0; then cosine over steps 2..6 (4 intervals) from 1.0 to 0.1
    expected = [0.5, 1.0] + [0.1 + 0.45 * (1 + math.cos(math.pi * i / 4)) for i in range(5)]
    got = [lr_at(s, **kw) for s in range(7)]
    assert got == pytest.approx(expected)
    assert got[2] == pytest.approx(1.0) and got[4] == pytest.approx(0.55) and got[6] == pytest.approx(0.1)


def test_wsd_schedule_hand_values():
    kw = dict(lr=1.0, min_lr=0.0, warmup=2, total=10, schedule="wsd", decay_fraction=0.4)
    # warmup 2 steps, stable until step 6, linear decay over the last 4 steps to 0 at step 9
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [lr_at(s, **kw) for s in range(10)] == pytest.approx(expected)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'; choose one of cosine, wsd"):
        lr_at(0, lr=1.0, min_lr=0.0, warmup=0, total=3, schedule="linear")


def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 10, bias=False))
    model[3].weight = model[0].weight  # tied head: an embedding, not decayed
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in decay["params"]} == {id(model[1].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].weight),
        id(model[1].bias),
        id(model[2].weight),
        id(model[2].bias),
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
