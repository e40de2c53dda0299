"""Checkpoints: atomic save, `latest`, keep-last-K, resume selection, one-line errors (toy modules)."""

from __future__ import annotations

import json
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


def _flip(path, offset: int = 64, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + n] = bytes(b ^ 0xFF for b in data[offset : offset + n])
    path.write_bytes(bytes(data))


def test_bit_flips_are_caught_and_auto_falls_back(tmp_path):
    model, opt = _toy()
    _save(tmp_path, 1, model, opt)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    bad = _save(tmp_path, 2, model, opt)
    (shard,) = bad.glob("*.distcp")
    _flip(shard)
    fresh, fresh_opt = _toy(seed=3)
    with pytest.raises(CheckpointError, match=rf"checkpoint {bad}: corrupt {shard.name} \(checksum mismatch\)"):
        load_checkpoint(bad, fresh, fresh_opt)
    found, skipped = ckpt.find_verified(tmp_path)
    assert found == tmp_path / "step-0000001"
    assert [(p, "checksum mismatch" in why) for p, why in skipped] == [(bad, True)]
    load_checkpoint(found, fresh, fresh_opt)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())


@pytest.mark.parametrize("damage", ["truncate-rng", "empty-metadata", "missing-shard"])
@pytest.mark.parametrize("manifest", [True, False], ids=["checksummed", "old-meta"])
def test_damaged_files_are_one_line_errors(tmp_path, capfd, caplog, damage, manifest):
    model, opt = _toy()
    path = _save(tmp_path, 1, model, opt)
    if not manifest:  # a checkpoint written before meta.json recorded its files
        meta = json.loads((path / "meta.json").read_text())
        del meta["files"]
        (path / "meta.json").write_text(json.dumps(meta))
    if damage == "truncate-rng":
        rng = path / "rng-rank0.pt"
        rng.write_bytes(rng.read_bytes()[:100])
        expected = "rng-rank0.pt"
    elif damage == "empty-metadata":
        (path / ".metadata").write_bytes(b"")
        expected = ".metadata"
    else:
        next(path.glob("*.distcp")).unlink()
        expected = "distcp" if manifest else "cannot be loaded"
    capfd.readouterr()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model, opt)
    assert str(e.value).startswith(f"checkpoint {path}: ") and expected in str(e.value) and "\n" not in str(e.value)
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info], "DCP logged tracebacks"


def test_keep_last_prunes_only_the_current_timeline(tmp_path):
    model, opt = _toy()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000004", "step-0000006"]
    _save(tmp_path, 5, model, opt, keep_last=1)  # a save below a newer checkpoint (an older timeline)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000005", "step-0000006"]
    assert (tmp_path / "latest").read_text().strip() == "step-0000005"


def test_set_aside_newer_and_newest_complete_wins(tmp_path):
    model, opt = _toy()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt)
    (tmp_path / "latest").write_text("step-0000001\n")  # a stale pointer does not hide a newer checkpoint
    assert find_latest(tmp_path) == tmp_path / "step-0000003"
    newer = ckpt.newer_than(tmp_path, 1)
    assert newer == [tmp_path / "step-0000002", tmp_path / "step-0000003"]
    dest = ckpt.set_aside(tmp_path, newer)
    assert dest.parent == tmp_path and dest.name.startswith("abandoned-")
    assert sorted(p.name for p in dest.iterdir()) == ["step-0000002", "step-0000003"]
    assert find_latest(tmp_path) == tmp_path / "step-0000001"
    assert (tmp_path / "latest").read_text().strip() == "step-0000001"


def test_leftovers_of_interrupted_saves_are_cleaned(tmp_path):
    model, opt = _toy()
    _save(tmp_path, 1, model, opt)
    _save(tmp_path, 2, model, opt)
    (tmp_path / "step-0000002").rename(tmp_path / "step-0000002.old")  # killed mid re-save of step 2
    _save(tmp_path, 1, model, opt).rename(tmp_path / "step-0000001.old")  # a finished re-save's leftover...
    _save(tmp_path, 1, model, opt)
    (tmp_path / "latest.tmp").write_text("step-0000009\n")
    ckpt.clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    ckpt.verify_checkpoint(tmp_path / "step-0000002")
