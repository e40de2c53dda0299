"""Pipeline parallelism (parallel/pp.py) on gloo: losses of a few AdamW steps and the first step's gradients match
one process that runs the same micro-batches of rows, for 1F1B (an MoE hybrid: aux losses from every stage; RWKV-7,
whose first layer's value crosses the stages), GPipe and Interleaved1F1B, and for pp x dp on 4 ranks; through the
Trainer, and checkpoints moving between pp=2, one process and dp=2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dist_pool import dist_pool, grad_error, packed_batches, tiny_model
from linear_moe.parallel.pp import PipelineRunner, doc_boundaries, split_layers

ROW = 16


def _rows(ids, labels, cu, a: int, b: int):
    """Rows [a, b) of a packed batch of rows (every row start is a document boundary)."""
    lo, hi = a * ROW, b * ROW
    local = sorted({0, hi - lo} | {c - lo for c in cu.tolist() if lo < c < hi})
    return ids[:, lo:hi], labels[:, lo:hi], torch.tensor(local, dtype=cu.dtype)


def _reference(model, batches, microbatches: int, rows: int):
    """One process: per micro-batch of rows, CE sum / all targets + aux / micro-batches; AdamW steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for ids, labels, cu in batches:
        count, total, per = (labels != -100).sum(), 0.0, rows // microbatches
        for i in range(microbatches):
            mids, mlab, mcu = _rows(ids, labels, cu, i * per, (i + 1) * per)
            out = model(mids, labels=mlab, cu_seqlens=mcu)
            obj = out.loss * (mlab != -100).sum() / count
            total += float(obj)
            if out.aux_loss is not None:
                obj = obj + out.aux_loss / microbatches
            obj.backward()
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, grads


def pp_job(mixer, pattern, preset, layers, schedule, microbatches, dp):
    """dp x pp ranks, 3 AdamW steps: (reference losses, pipelined losses, first-step gradient error)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "pp"))
    rows = 4
    batches = packed_batches(3, rows=rows * dp, row_len=ROW)
    d = mesh["dp"].get_local_rank()
    ref_losses, ref_grads = _reference(
        tiny_model(mixer, pattern, preset, layers), batches, microbatches * dp, rows * dp
    )
    runner = PipelineRunner(
        tiny_model(mixer, pattern, preset, layers), mesh, schedule, microbatches, torch.device("cpu")
    )
    params = dict(runner.model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, grads = [], {}
    for ids, labels, cu in batches:
        count = float((labels != -100).sum())
        mine = _rows(ids, labels, cu, d * rows, (d + 1) * rows)
        out = runner.step(*mine, rows, count, aux_weight=1 / dp)
        lm = out.loss * (mine[1] != -100).sum() / count  # this dp rank's share of the global mean
        for p in params.values():
            dist.all_reduce(p.grad, group=mesh["dp"].get_group())
        dist.all_reduce(lm, group=mesh["dp"].get_group())
        grads = grads or {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad()
        losses.append(float(lm))
    return ref_losses, losses, grad_error(grads, {n: ref_grads[n] for n in grads})


CASES = {
    "1F1B-moe-hybrid": ("gated_deltanet", "LN", "debug-qwen2-moe", 4, "1F1B", 2, 1),
    "GPipe-gla": ("gla", None, "debug-dense", 2, "GPipe", 4, 1),
    "interleaved-retnet-hybrid": ("retnet", "LLLN", "debug-mixtral", 4, "Interleaved1F1B", 2, 1),
    "1F1B-rwkv7": ("rwkv7", None, "debug-dense", 4, "1F1B", 2, 1),  # v_first crosses the stages
}


@pytest.mark.parametrize("case", list(CASES))
def test_pp_matches_one_process(case):
    for ref, got, err in dist_pool(2).run(pp_job, *CASES[case]):
        assert got == pytest.approx(ref, rel=1e-5)
        assert err < 1e-5


def test_pp_times_dp_matches_one_process():
    for ref, got, err in dist_pool(4).run(pp_job, "gated_deltanet", "LN", "debug-qwen2-moe", 4, "1F1B", 2, 2):
        assert got == pytest.approx(ref, rel=1e-5)
        assert err < 1e-5


def test_doc_boundaries_and_split():
    doc = torch.tensor([0, 0, 1, 1, 1, 4, 5, 5])
    assert doc_boundaries(doc).tolist() == [0, 2, 5, 6, 8]
    assert split_layers(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ValueError, match="equal stages"):
        split_layers(6, 4)


def pp_trainer_job(case: str, layout: dict, run_dir: str, resume: str | None = None) -> dict:
    """`test_parallel_dp_ep.train_job` under pipeline parallelism (from checkpoint `resume`): every rank returns
    its records and its stages' parameters (the union is the whole model)."""
    from linear_moe.train.run import build_model
    from linear_moe.train.trainer import Trainer
    from test_parallel_dp_ep import ROWS, GlobalRows, run_config

    cfg = run_config(case, run_dir, layout)
    trainer = Trainer(cfg, build_model(cfg), GlobalRows(ROWS))
    if resume is not None:
        trainer.resume(Path(resume))
    trainer.fit()
    records = [r for r in trainer.history if r["split"] == "train"]
    result = {k: [r[k] for r in records] for k in ("loss", "aux_loss", "grad_norm", "tokens", "expert_load")}
    result["dropped"] = [r.get("dropped") for r in records]
    state = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in trainer.model.state_dict().items()}
    return {**result, "state": {n: t.detach().clone() for n, t in state.items()}}


PP2 = {"pp": 2, "dp_shard": 1, "pp_schedule": "GPipe", "pp_microbatches": 1}
_PP_RUNS: dict[str, tuple[dict, dict]] = {}


def pp_run(case: str, tmp_path_factory) -> tuple[dict, dict]:
    """`case` trained under pp=2 on 2 ranks (checkpoints after each step under `run_dir`): both ranks' results."""
    if case not in _PP_RUNS:
        run_dir = tmp_path_factory.mktemp(f"{case}-pp")
        first, last = dist_pool(2).run(pp_trainer_job, case, PP2, str(run_dir))
        _PP_RUNS[case] = ({**first, "run_dir": run_dir}, last)
    return _PP_RUNS[case]


def test_pp_through_the_trainer_matches_one_process(tmp_path_factory):
    """pp=2 on 2 ranks through the Trainer (one pipeline micro-batch: the aux losses see the reference's rows)."""
    from test_parallel_dp_ep import assert_matches, reference

    ref = reference("gla-v3", tmp_path_factory)
    first, last = pp_run("gla-v3", tmp_path_factory)
    assert first["state"].keys().isdisjoint(last["state"].keys())
    assert {k: first[k] for k in ("loss", "aux_loss", "expert_load")} == {
        k: last[k] for k in ("loss", "aux_loss", "expert_load")
    }
    assert_matches({**first, "state": {**first["state"], **last["state"]}}, ref)


def test_pp_logs_the_capacity_drops_of_one_process(tmp_path_factory):
    """With a capacity limit (one pipeline micro-batch: the reference's rows) every pipeline rank reports the
    drops of all MoE layers, its own and the other stage's, as one process counts them."""
    from test_parallel_dp_ep import reference

    ref = reference("gla-v3-capacity", tmp_path_factory)
    assert all(sum(d) > 0 for d in ref["dropped"])  # the limit bites at every step
    first, last = pp_run("gla-v3-capacity", tmp_path_factory)
    assert first["dropped"] == ref["dropped"] == last["dropped"]
    assert first["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_pp_checkpoints_move_between_layouts(tmp_path_factory):
    """A checkpoint of step 1 of 3 written under pp=2 (each rank its own stage's parameters and Adam moments) resumes
    in one process and under dp=2 (FSDP), and one process's resumes under pp=2: the two steps after it give the
    losses, gradient norms and final parameters of the run that wrote it (DCP reshards by parameter name)."""
    from test_parallel_dp_ep import reference, train_job

    first, last = pp_run("gla-v3", tmp_path_factory)
    pp_ckpt = str(first["run_dir"] / "checkpoints" / "step-0000001")
    pp_state = {**first["state"], **last["state"]}
    one = train_job("gla-v3", {}, str(tmp_path_factory.mktemp("one-from-pp")), pp_ckpt)
    dp2 = dist_pool(2).run(train_job, "gla-v3", {}, str(tmp_path_factory.mktemp("dp-from-pp")), pp_ckpt)[0]
    for got in (one, dp2):
        assert got["loss"] == pytest.approx(first["loss"][1:], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(first["grad_norm"][1:], rel=1e-4)
        torch.testing.assert_close(got["state"], pp_state, rtol=1e-4, atol=2e-5)

    ref = reference("gla-v3", tmp_path_factory)
    ref_ckpt = str(ref["run_dir"] / "checkpoints" / "step-0000001")
    a, b = dist_pool(2).run(pp_trainer_job, "gla-v3", PP2, str(tmp_path_factory.mktemp("pp-from-one")), ref_ckpt)
    assert a["loss"] == pytest.approx(ref["loss"][1:], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(ref["grad_norm"][1:], rel=1e-4)
    torch.testing.assert_close({**a["state"], **b["state"]}, ref["state"], rtol=1e-4, atol=2e-5)
