"""parallel/scaling.py against bytes counted on gloo: one training step of a tiny model under tp, cp, pp and FSDP
(2 ranks each); every collective's input is counted by a dispatch mode and summed per kind."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from dist_pool import dist_pool, packed_batches, tiny_model
from linear_moe.parallel.config import ParallelConfig
from linear_moe.parallel.scaling import moved_bytes, step_traffic

OPS = {  # dispatcher op name fragments -> kind
    "all_gather_into_tensor": "all_gather",
    "_allgather_base_": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "all_to_all_single": "all_to_all",
    "c10d.send.": "send",
    "allreduce_": "all_reduce",
}
ROWS, ROW = 4, 16  # 64 tokens per step


class CountCollectives(TorchDispatchMode):
    """Input bytes of every collective, per kind (pipelining's one-element / byte metadata sends left out)."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        kind = next((k for frag, k in OPS.items() if frag in name), None)
        if kind is not None:
            arg = args[1] if "_base_" in name else args[0]  # c10d's *_base_ ops take (output, input)
            ts = arg if isinstance(arg, list | tuple) else [arg]
            for t in ts:
                if isinstance(t, torch.Tensor) and t.numel() > 1 and t.dtype != torch.uint8:
                    self.bytes[kind] += t.numel() * t.element_size()
        return func(*args, **(kwargs or {}))


def count_job(dim: str) -> dict:
    """One forward-backward of a tiny model with `dim`=2 over both ranks; this rank's counted bytes per kind."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=(dim,))
    ids, labels, cu = packed_batches(1, rows=ROWS, row_len=ROW)[0]
    counter = CountCollectives()
    if dim == "tp":
        from linear_moe.parallel.tp import apply_tp, loss_context

        model = tiny_model("gated_deltanet", "LN", "debug-qwen2-moe")
        apply_tp(model, mesh)
        with counter, loss_context(model):
            out = model(ids, labels=labels, cu_seqlens=cu)
            (out.loss + out.aux_loss).backward()
    elif dim == "cp":
        from linear_moe.parallel.cp import apply_cp, shard_batch

        model = tiny_model("gated_deltanet", "LN")
        apply_cp(model, mesh)
        lids, llab, lcu = shard_batch(model, ids, labels, cu)
        with counter:
            model(lids, labels=llab, cu_seqlens=lcu).loss.backward()
    elif dim == "pp":
        from linear_moe.parallel.pp import PipelineRunner

        runner = PipelineRunner(tiny_model("gated_deltanet", "LN", layers=4), mesh, "1F1B", 2, torch.device("cpu"))
        with counter:
            runner.step(ids, labels, cu, ROWS, float((labels != -100).sum()))
    else:
        from linear_moe.parallel.fsdp import apply_fsdp

        model = tiny_model("gated_deltanet", "LLN", layers=3)
        apply_fsdp(model, mesh, None, None)
        rows = slice(dist.get_rank() * 32, (dist.get_rank() + 1) * 32)
        with counter:
            model(ids[:, rows], labels=labels[:, rows]).loss.backward()
    return dict(counter.bytes)


CASES = {  # dim -> (model, layout, step_traffic options)
    "tp": (
        dict(mixer="gated_deltanet", pattern="LN", preset="debug-qwen2-moe"),
        dict(tp=2, dp_shard=1),
        {"param_bytes": 4},  # float32 gradients of the shared weights, all-reduced
    ),
    "cp": (dict(mixer="gated_deltanet", pattern="LN"), dict(cp=2, dp_shard=1), {}),
    "pp": (dict(mixer="gated_deltanet", pattern="LN", layers=4), dict(pp=2, dp_shard=1), {}),
    "fsdp": (dict(mixer="gated_deltanet", pattern="LLN", layers=3), dict(dp_shard=2), {"param_bytes": 4}),
}


@pytest.mark.parametrize("dim", list(CASES))
def test_step_traffic_matches_gloo_counts(dim):
    model_kw, layout_kw, opts = CASES[dim]
    counted = dist_pool(2).run(count_job, dim)
    cfg = tiny_model(**model_kw).cfg
    # this dimension's collectives only (with cp > 1 FSDP would also shard over the cp ranks)
    traffic = [
        t for t in step_traffic(cfg, ParallelConfig(**layout_kw), ROWS * ROW, act_bytes=4, **opts) if t.dim == dim
    ]
    predicted = Counter()
    for t in traffic:
        predicted[t.kind] += t.input_bytes
    # per rank for tp / cp / fsdp (every rank alike); pipeline stages differ: their average
    got = {k: sum(c.get(k, 0) for c in counted) / len(counted) for k in predicted}
    small = {k: v for c in counted for k, v in c.items() if k not in predicted}
    assert got == pytest.approx(dict(predicted), rel=1e-9)
    assert all(v < 1024 for v in small.values()), small  # only left-out kilobyte terms (per-head norm grads)
    assert moved_bytes(traffic)[dim] > 0
