"""The layout (`ParallelConfig`, `check_layout`): one-line errors for each dimension that does not fit; the DeviceMesh
views on 4 gloo ranks against the row-major rank grid by hand; data-parallel ranks together read exactly the rows
of one process reading the whole micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_pool import dist_pool
from linear_moe.config import ConfigError
from linear_moe.data import PackedDataset
from linear_moe.model import ModelConfig
from linear_moe.moe import moe_preset
from linear_moe.parallel import ParallelConfig, build_mesh, check_layout
from test_data import write_synthetic

MODEL = ModelConfig(64, 32, 4, 4, "gla", num_kv_heads=2, moe=moe_preset("mixtral", num_experts=6, top_k=2))


def test_dp_shard_takes_the_rest_and_describe_names_the_layout():
    cfg = check_layout(ParallelConfig(tp=2, ep=2), 8, MODEL, 64, 8)
    assert (cfg.dp_shard, cfg.dp, cfg.expert_shard, cfg.world_size) == (4, 4, 2, 8)
    assert cfg.describe() == "dp_shard=4 tp=2 ep=2 (world 8)"
    assert check_layout(ParallelConfig(), 1, MODEL, 64).describe() == "dp_shard=1 (world 1)"


@pytest.mark.parametrize(
    "layout, world, seq_len, rows, match",
    [
        ({"dp_shard": 2}, 4, 64, 8, r"dp_replicate\*dp_shard\*cp\*tp\*pp = 1\*2\*1\*1\*1 = 2 but 4 processes"),
        ({"dp_replicate": 3}, 4, 64, 8, r"dp_replicate\*cp\*tp\*pp=3 does not divide the world size 4"),
        ({"ep": 4}, 2, 64, 8, r"parallel.ep=4 must divide dp_shard\*cp=2"),
        ({"ep": 4}, 4, 64, 8, r"parallel.ep=4 must divide model.moe.num_experts=6"),
        ({"tp": 4}, 4, 64, 8, r"parallel.tp=4 must divide model.num_kv_heads=2"),
        ({"pp": 3}, 3, 64, 9, r"parallel.pp=3 must divide model.num_layers=4"),
        ({"cp": 2}, 2, 63, 8, r"parallel.cp=2 must divide data.seq_len=63"),
        ({}, 4, 64, 6, r"data.micro_batch_size=6 .* must be a multiple of dp_replicate\*dp_shard=4"),
        ({"tp": 0}, 1, 64, 8, r"parallel.tp must be at least 1"),
    ],
)
def test_layout_errors_are_one_line(layout, world, seq_len, rows, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_layout(ParallelConfig(**layout), world, MODEL, seq_len, rows)
    assert "\n" not in str(e.value)


def test_ep_needs_an_moe_model():
    with pytest.raises(ConfigError, match="needs an MoE model"):
        check_layout(ParallelConfig(ep=2), 2, MODEL.replace(moe=None), 64)


def mesh_job() -> dict:
    """dp_replicate=2 x dp_shard=2 with ep=2 on 4 ranks: the ranks of each view this rank belongs to."""
    mesh = build_mesh(check_layout(ParallelConfig(dp_replicate=2, ep=2), 4, MODEL, 64, 4), "cpu")
    views = ("dp_replicate", "dp_shard", "dp", "dp_cp", "dp_shard_cp", "ep", "efsdp", "tp")
    groups = {v: dist.get_process_group_ranks(mesh[v].get_group()) for v in views}
    return {**groups, "dp_rank": mesh.dp_rank}


def test_mesh_views_on_four_ranks():
    # row-major grid (dp_replicate, dp_shard) = rank // 2, rank % 2; experts: (dp_replicate, efsdp=1, ep=2)
    for rank, got in enumerate(dist_pool(4).run(mesh_job)):
        rep, shard = divmod(rank, 2)
        assert got["dp_replicate"] == [shard, shard + 2]
        assert got["dp_shard"] == got["dp_shard_cp"] == got["ep"] == [2 * rep, 2 * rep + 1]
        assert got["dp"] == got["dp_cp"] == [0, 1, 2, 3]
        assert got["efsdp"] == got["tp"] == [rank]
        assert got["dp_rank"] == rank


def test_data_parallel_ranks_read_one_process_rows(tmp_path):
    write_synthetic(tmp_path / "d", 400, [0, 13, 50, 51, 170, 300])
    whole = PackedDataset(tmp_path / "d", seq_len=12, micro_batch_size=6, seed=3)
    half = PackedDataset(tmp_path / "d", seq_len=12, micro_batch_size=3, seed=3)
    for step in range(4):
        ref = whole.get_batch(step)
        parts = [half.get_batch(step, rank, 2) for rank in range(2)]
        for name in ("input_ids", "labels"):
            torch.testing.assert_close(torch.cat([getattr(p, name) for p in parts], 1), getattr(ref, name))
        cu = np.concatenate([parts[0].cu_seqlens[:-1], parts[1].cu_seqlens + 36])
        np.testing.assert_array_equal(cu, ref.cu_seqlens)
