"""FSDP2 on one GPU: the Trainer in a world of one NCCL rank (FSDP2 with bf16 parameters and float32 gradient
reduction) follows the plain model under bf16 autocast within bf16 noise, keeps float32 master weights sharded as
DTensors, and the run's expert bias and losses behave as the plain run's."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from linear_moe.data.packed import make_batch
from linear_moe.model import ModelConfig
from linear_moe.moe import moe_preset
from linear_moe.train.config import DataConfig, RunConfig, TrainConfig
from linear_moe.train.run import build_model
from linear_moe.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SEQ, ROWS, VOCAB = 256, 8, 512


class Rows:
    """Rows of random tokens from a fixed random bigram table (learnable), one document boundary per row."""

    def __init__(self, rows: int):
        self.rows = rows
        self.next_V = np.random.default_rng(0).integers(0, VOCAB, size=VOCAB)

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1):
        g = np.random.default_rng([3, step])
        n = world_size * self.rows
        first = g.integers(0, VOCAB, size=(n, 1))
        ids = np.concatenate([first, self.next_V[(first + np.arange(1, SEQ + 1)) % VOCAB]], axis=1)
        mine = slice(rank * self.rows, (rank + 1) * self.rows)
        starts = [np.asarray([SEQ // 2])] * self.rows
        return make_batch(ids[mine, :-1], ids[mine, 1:], starts)


def run(tmp_path, name: str):
    moe = moe_preset("deepseek_v3", num_experts=8, top_k=2, expert_ffn_hidden_size=256, balance_seq_wise=False)
    model = ModelConfig(VOCAB, 256, 2, 4, "gla", moe=moe, max_seq_len=SEQ)
    train = TrainConfig(
        steps=6,
        lr=3e-3,
        warmup=1,
        log_every=1,
        eval_every=0,
        eval_batches=0,
        run_dir=str(tmp_path / name),
        device="cuda",
        tensorboard=False,
        progress=False,
        plot=False,
    )
    cfg = RunConfig(model, DataConfig(seq_len=SEQ, micro_batch_size=ROWS), train)
    trainer = Trainer(cfg, build_model(cfg), Rows(ROWS))
    trainer.fit()
    return trainer, [r["loss"] for r in trainer.history if r["split"] == "train"]


def test_fsdp2_world_of_one_follows_the_plain_model(tmp_path):
    _, plain = run(tmp_path, "plain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        trainer, sharded = run(tmp_path, "fsdp")
        w13 = trainer.model.layers[0].ffn.experts.w13
        assert isinstance(w13, DTensor) and w13.dtype == torch.float32  # master weights stay float32
        assert trainer.model.layers[0].ffn.expert_bias.abs().sum() > 0  # aux-free bias updated
    finally:
        dist.destroy_process_group()
    assert sharded[-1] < sharded[0] - 0.5  # it learns the bigrams
    assert sharded == pytest.approx(plain, rel=3e-2)  # bf16 parameters vs bf16 autocast of float32 weights
