"""Data and expert parallelism through the Trainer on gloo: FSDP2 (dp_shard), expert parallel (ep), dp x ep on 4
ranks and HSDP (dp_replicate x dp_shard) follow one process reading the same global batches: per-step losses, aux
losses, gradient norms, final parameters and the aux-free expert bias, for a scalar-decay (lightning_attn), a
vector-decay (gla) and a delta-rule mixer (gated_deltanet, with softmax attention); checkpoints move between
layouts (2 ranks with experts split -> 1 process, 1 process -> 2 ranks); the all-to-all dispatcher against a hand
reference with an empty split; `torchrun -m linear_moe train` with 2 processes against 1 process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dist_pool import dist_pool
from linear_moe.data.packed import Batch, make_batch
from linear_moe.model import ModelConfig
from linear_moe.moe import moe_preset
from linear_moe.parallel.config import ParallelConfig, run_layout
from linear_moe.train.config import DataConfig, RunConfig, TrainConfig
from linear_moe.train.run import build_model
from linear_moe.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
SEQ, ROWS, VOCAB, STEPS = 16, 4, 64, 3
CASES = {  # mixer, layer pattern, MoE family, MoE overrides
    "lightning-mixtral": ("lightning_attn", None, "mixtral", {}),  # softmax router, balance loss
    "gla-v3": ("gla", None, "deepseek_v3", {"balance_coef": 0.01}),  # sigmoid router, aux-free bias, seq-wise balance
    "gdn-v2-hybrid": ("gated_deltanet", "LN", "deepseek_v2", {}),  # device balance, sequence-wise balance
    "gla-v3-capacity": ("gla", None, "deepseek_v3", {"balance_coef": 0.01, "capacity_factor": 0.8}),  # drops
}
DROPLESS = ["lightning-mixtral", "gla-v3", "gdn-v2-hybrid"]  # every layout is the one-process run


class RankRows:
    """One process reading what `GlobalRows` gives `ranks` ranks, each rank's rows as a micro-batch of its own:
    micro-batch `step` is rank `step % ranks`'s block of global micro-batch `step // ranks`."""

    def __init__(self, rows: int, ranks: int):
        self.rows, self.ranks = rows, ranks

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        return GlobalRows(self.rows).get_batch(step // self.ranks, step % self.ranks, self.ranks)


class GlobalRows:
    """Packed batches whose global micro-batch `step` is `world_size * rows` random rows (a random document
    boundary and ignored targets in each); rank r reads rows [r * rows, (r + 1) * rows)."""

    def __init__(self, rows: int):
        self.rows = rows

    def get_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        g = np.random.default_rng([7, step])
        n = world_size * self.rows
        ids = g.integers(0, VOCAB, size=(n, SEQ))
        labels = np.where(g.random((n, SEQ)) < 0.2, -100, g.integers(0, VOCAB, size=(n, SEQ)))
        starts = [np.asarray([s]) for s in g.integers(1, SEQ, size=n)]
        mine = slice(rank * self.rows, (rank + 1) * self.rows)
        return make_batch(ids[mine], labels[mine], starts[mine])


def run_config(case: str, run_dir: str, layout: dict, rows: int = ROWS, grad_accum: int = 2) -> RunConfig:
    mixer, pattern, family, moe_kwargs = CASES[case]
    moe = moe_preset(family, num_experts=4, top_k=2, expert_ffn_hidden_size=16, **moe_kwargs)
    model = ModelConfig(VOCAB, 32, 2, 2, mixer, layer_pattern=pattern, moe=moe, max_seq_len=64)
    train = TrainConfig(
        steps=STEPS,
        grad_accum=grad_accum,  # the global target count and the aux weights span micro-batches and ranks
        lr=3e-3,
        min_lr=3e-4,
        warmup=1,
        log_every=1,
        eval_every=0,
        eval_batches=0,
        save_every=1,
        keep_last=0,
        run_dir=run_dir,
        device="cpu",
        tensorboard=False,
        progress=False,
        plot=False,
    )
    return RunConfig(model, DataConfig(seq_len=SEQ, micro_batch_size=rows), train, parallel=ParallelConfig(**layout))


def train_job(
    case: str, layout: dict, run_dir: str, resume: str | None = None, rows: int = ROWS, split: int = 1
) -> dict | None:
    """Train `case` under `layout` (from checkpoint `resume`) on global micro-batches of `rows` rows; rank 0 returns
    the records and the whole parameters and buffers. `split` > 1 (one process): every global micro-batch runs as
    `split` micro-batches, the rows of each of `split` data-parallel ranks."""
    if split > 1:
        cfg = run_config(case, run_dir, layout, rows // split, grad_accum=2 * split)
        data = RankRows(rows // split, split)
    else:
        cfg = run_config(case, run_dir, layout, rows)
        data = GlobalRows(rows // run_layout(cfg).dp)
    trainer = Trainer(cfg, build_model(cfg), data)
    if resume is not None:
        trainer.resume(Path(resume))
    trainer.fit()
    state = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in trainer.model.state_dict().items()}
    records = [r for r in trainer.history if r["split"] == "train"]
    result = {k: [r[k] for r in records] for k in ("loss", "aux_loss", "grad_norm", "tokens")}
    result["expert_load"] = [r["expert_load"] for r in records]
    result["dropped"] = [r.get("dropped") for r in records]
    return {**result, "state": {n: t.detach().clone() for n, t in state.items()}} if trainer.rank0 else None


_REFERENCES: dict[tuple[str, int], dict] = {}


def reference(case: str, tmp_path_factory, rows: int = ROWS) -> dict:
    """One process reading every row (checkpoints after each step under its run_dir)."""
    if (case, rows) not in _REFERENCES:
        run_dir = tmp_path_factory.mktemp(f"ref-{case}")
        _REFERENCES[case, rows] = {**train_job(case, {}, str(run_dir), rows=rows), "run_dir": run_dir}
    return _REFERENCES[case, rows]


def assert_matches(got: dict, ref: dict) -> None:
    """Float32 sums in another order: losses agree to ~1e-7; Adam's normalised steps amplify the gradients'
    rounding differences a little with every step (gradient norms to ~1e-5 after 3 steps)."""
    for key in ("loss", "aux_loss"):
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert got["tokens"] == ref["tokens"]
    assert got["expert_load"] == ref["expert_load"]  # global counts
    assert got["dropped"] == ref["dropped"]  # capacity drops summed over ranks (None without capacity)
    assert got["state"].keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.parametrize("case", DROPLESS)
def test_fsdp_and_ep_on_two_ranks_match_one_process(case, tmp_path_factory):
    ref = reference(case, tmp_path_factory)
    for layout in ({}, {"ep": 2}):  # FSDP over 2 ranks; experts split over them (and FSDP over both)
        run_dir = tmp_path_factory.mktemp(f"{case}-2")
        assert_matches(dist_pool(2).run(train_job, case, layout, str(run_dir))[0], ref)


def test_dp_x_ep_and_hsdp_on_four_ranks_match_one_process(tmp_path_factory):
    ref = reference("gla-v3", tmp_path_factory)
    for layout in ({"ep": 2}, {"dp_replicate": 2, "ep": 2}, {"dp_replicate": 2}):
        run_dir = tmp_path_factory.mktemp("gla-v3-4")
        assert_matches(dist_pool(4).run(train_job, "gla-v3", layout, str(run_dir))[0], ref)


def test_checkpoints_move_between_layouts(tmp_path_factory):
    """2 ranks with experts split resume one process's step-2 checkpoint; one process resumes theirs; both end
    where the reference ends."""
    ref = reference("gdn-v2-hybrid", tmp_path_factory)
    step2 = ref["run_dir"] / "checkpoints" / "step-0000002"
    run_dir = tmp_path_factory.mktemp("ep-from-one")
    got = dist_pool(2).run(train_job, "gdn-v2-hybrid", {"ep": 2}, str(run_dir), str(step2))[0]
    torch.testing.assert_close(got["state"], ref["state"], rtol=1e-4, atol=2e-5)
    assert got["loss"] == pytest.approx(ref["loss"][2:], rel=2e-5)
    their_last = str(run_dir / "checkpoints" / "step-0000003")  # written by the 2 ranks (experts as DTensors)
    one = train_job("gdn-v2-hybrid", {}, str(tmp_path_factory.mktemp("one-from-ep")), their_last)
    assert one["loss"] == []  # nothing left to train: the loaded state is the final one
    torch.testing.assert_close(one["state"], ref["state"], rtol=1e-4, atol=2e-5)


def test_capacity_is_per_rank(tmp_path_factory):
    """With capacity_factor each rank drops against its own tokens: ep=2 (FSDP over the 2 ranks) follows one
    process that runs each rank's rows as a micro-batch of its own, the logged drops summed over the ranks."""
    run_dir = tmp_path_factory.mktemp("ref-capacity")
    ref = train_job("gla-v3-capacity", {}, str(run_dir), split=2)
    assert all(sum(d) > 0 for d in ref["dropped"])  # the limit bites at every step
    run_dir = tmp_path_factory.mktemp("capacity-ep")
    assert_matches(dist_pool(2).run(train_job, "gla-v3-capacity", {"ep": 2}, str(run_dir))[0], ref)


def a2a_job() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """4 experts over 2 ranks; rank 1 routes every token to experts 2 and 3 (an empty split to rank 0). The
    experts scale their rows by (global expert id + 1)."""
    from linear_moe.moe import AllToAllDispatcher, Routing

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x_TD = torch.randn(5, 3, generator=g, requires_grad=True)
    experts_TK = (
        torch.randint(0, 4, (5, 2), generator=g) if rank == 0 else torch.tensor([[2, 3], [3, 2]] * 2 + [[3, 2]])
    )
    weights_TK = torch.rand(5, 2, generator=g)
    d = AllToAllDispatcher(4, dist.group.WORLD)
    rows_MD, counts_e, ctx = d.dispatch(x_TD, Routing(None, None, experts_TK, weights_TK))
    expert_M = torch.repeat_interleave(torch.arange(2) + 2 * rank, counts_e)
    y_TD = d.combine(rows_MD * (expert_M + 1).unsqueeze(1), ctx, weights_TK)
    (grad,) = torch.autograd.grad(y_TD.square().sum(), x_TD)
    ref_TD = (weights_TK * (experts_TK + 1)).sum(1, keepdim=True) * x_TD
    (ref_grad,) = torch.autograd.grad(ref_TD.square().sum(), x_TD)
    return y_TD.detach(), ref_TD.detach(), grad, ref_grad, counts_e.tolist() + ctx.send


def test_all_to_all_dispatch_and_combine_by_hand():
    (y0, r0, g0, rg0, meta0), (y1, r1, g1, rg1, meta1) = dist_pool(2).run(a2a_job)
    for y, ref, g, rg in ((y0, r0, g0, rg0), (y1, r1, g1, rg1)):
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(g, rg)
    assert meta1[2:] == [0, 10]  # rank 1 sends nothing to rank 0
    assert sum(meta0[:2]) + sum(meta1[:2]) == 20  # every assignment computed once


SMALL = [
    "data.split_docs=true",
    "data.vocab_size=300",
    "data.seq_len=32",
    "data.micro_batch_size=4",
    "data.val_fraction=0.1",
    "train.steps=3",
    "train.warmup=1",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_batches=1",
    "train.sample_tokens=4",
    "train.tensorboard=false",
    "train.progress=false",
    "train.plot=false",
]


def test_torchrun_two_processes_follow_one(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "A linear model mixes tokens with a state.\n\nExperts route tokens to feed-forward nets.\n\n" * 40
    )
    args = ["-m", "linear_moe", "train", "configs/default.yaml", f"data.inputs=[{corpus}]", *SMALL]
    one = subprocess.run(
        [sys.executable, *args, f"train.run_dir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run_dir = tmp_path / "two"
    two = subprocess.run(
        [*torchrun, *args, f"data.path={tmp_path / 'one' / 'data'}", "parallel.ep=2", f"train.run_dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "layout: dp_shard=2 ep=2 (world 2) on cpu" in two.stderr
    records = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (tmp_path / "one", run_dir)
    ]
    assert [r["step"] for r in records[1]] == [r["step"] for r in records[0]]  # one record per step, from rank 0
    for a, b in zip(*records, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert (run_dir / "checkpoints" / "step-0000003" / "rng-rank1.pt").is_file()
