"""Checkpoints: atomic save, `latest`, keep-last-K, resume selection, one-line errors (toy modules)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from linear_moe.train import checkpoint as ckpt
from linear_moe.train.checkpoint import CheckpointError, find_latest, load_checkpoint, save_checkpoint


def _toy(width: int = 4, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, width)).pow(2).sum().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, keep_last=0):
    return save_checkpoint(
        root, step, model, opt, config_yaml="x: 1\n", meta={"data": {"step": step}}, keep_last=keep_last
    )


def test_round_trip_model_optimizer_rng(tmp_path):
    model, opt = _toy()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    path = _save(tmp_path, 7, model, opt)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    model2, opt2 = _toy(seed=1)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    meta = load_checkpoint(path, model2, opt2)
    assert meta["step"] == 7 and meta["data"] == {"step": 7}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for sa, sb in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keep_last_and_latest(tmp_path):
    model, opt = _toy()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000003", "step-0000004"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000004"
    assert find_latest(tmp_path) == tmp_path / "step-0000004"


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    model, opt = _toy()
    _save(tmp_path, 1, model, opt, keep_last=1)

    def crash():  # the DCP shards are on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "capture_rng", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, model, opt, keep_last=1)
    monkeypatch.undo()
    assert (tmp_path / "step-0000002.tmp").is_dir()
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"
    assert find_latest(tmp_path) == tmp_path / "step-0000001"
    (tmp_path / "latest").unlink()  # even without the pointer, the half checkpoint is never chosen
    assert find_latest(tmp_path) == tmp_path / "step-0000001"
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "step-0000002.tmp", model, opt)
    _save(tmp_path, 2, model, opt, keep_last=1)  # the next save cleans up the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000002"]


def test_mismatched_and_corrupt_checkpoints_raise_one_line(tmp_path):
    model, opt = _toy()
    path = _save(tmp_path, 1, model, opt)
    wide, wide_opt = _toy(width=5)
    with pytest.raises(CheckpointError, match=r"step-0000001: cannot be loaded .*[Ss]ize mismatch") as e:
        load_checkpoint(path, wide, wide_opt)
    assert "\n" not in str(e.value)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-0000001: incomplete or corrupt \(missing meta.json\)"):
        load_checkpoint(path, model, opt)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope", model, opt)
