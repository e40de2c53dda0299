"""Context parallelism (parallel/cp.py) on gloo: losses and parameters after a few AdamW steps match one process,
for a scalar-decay (retnet, with RoPE offsets), a vector-decay (gla, with short convolutions) and a delta-rule
mixer (gated_deltanet) in a hybrid stack with softmax attention, packed documents crossing the ranks' slices."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dist_pool import dist_pool, grad_error, packed_batches, tiny_model, train_reference
from linear_moe.parallel.cp import apply_cp, check_supported, cp_layout, final_state_and_transition, shard_batch

ROW = 48


def _row(ids, labels, cu, d):
    """Row d of a packed batch of rows (a document boundary at every row start)."""
    a, b = d * ROW, (d + 1) * ROW
    local = [c - a for c in cu.tolist() if a <= c <= b]
    return ids[:, a:b], labels[:, a:b], torch.tensor(local, dtype=cu.dtype)


def cp_job(mixer: str, pattern: str | None, dp: int, kwargs: dict) -> tuple[list[float], list[float], float]:
    """dp x cp ranks (each dp rank one row, split over cp), 3 AdamW steps: (reference losses, parallel losses, the
    first step's gradient error)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "cp"))
    batches = packed_batches(3, rows=dp, row_len=ROW)
    ref_losses, ref_grads = train_reference(tiny_model(mixer, pattern, **kwargs), batches)
    model = tiny_model(mixer, pattern, **kwargs)
    apply_cp(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for ids, labels, cu in batches:
        count = (labels != -100).sum()
        lids, llab, lcu = shard_batch(model, *_row(ids, labels, cu, mesh["dp"].get_local_rank()))
        share = model(lids, labels=llab, cu_seqlens=lcu).loss * (llab != -100).sum() / count
        share.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)  # as FSDP over dp_cp: gradients summed over every rank
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        total = share.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total))
    return ref_losses, losses, grad_error(grads, ref_grads)


CASES = {
    "retnet": ("retnet", None, {}),  # scalar decay, RoPE offsets in the carried state
    "gla-conv": ("gla", None, {"use_short_conv": True}),  # vector decay, short-conv halos
    "gdn-hybrid": ("gated_deltanet", "LN", {}),  # delta rule + softmax attention (all-gathered KV)
}


@pytest.mark.parametrize("case", list(CASES))
def test_cp_matches_one_process(case):
    mixer, pattern, kwargs = CASES[case]
    for ref, got, diff in dist_pool(2).run(cp_job, mixer, pattern, 1, kwargs):
        assert got == pytest.approx(ref, rel=1e-5)
        assert diff < 1e-5


def test_cp_times_dp_matches_one_process():
    for ref, got, diff in dist_pool(4).run(cp_job, "gated_deltanet", "LN", 2, {}):
        assert got == pytest.approx(ref, rel=1e-5)
        assert diff < 1e-5


def test_cp_layout_by_hand():
    # 4 ranks of 12 tokens, documents [0, 13), [13, 40), [40, 48)
    lay = cp_layout([0, 13, 40, 48], 48, 1, 2, 4)
    assert lay.continues == [False, True, True, True]
    assert lay.single == [True, False, True, False]
    assert lay.first_offset == [0, 12, 11, 23]
    assert lay.last_offset == [0, 0, 11, 0] and lay.last_len == [12, 11, 12, 8]
    assert lay.chain(2) == [1] and lay.chain(3) == [1, 2] and lay.chain(1) == [0]


def test_cp_refuses_unknown_states():
    with pytest.raises(ValueError, match="cp cannot carry"):
        check_supported(tiny_model("rwkv7").layers[0].mixer)


def test_cp_through_the_trainer_matches_one_process(tmp_path_factory):
    """cp=2 on 2 ranks through the Trainer (FSDP2 over the cp ranks, MoE statistics summed over them)."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gdn-v2-hybrid", tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("gdn-cp")
    assert_matches(dist_pool(2).run(train_job, "gdn-v2-hybrid", {"cp": 2, "dp_shard": 1}, str(run_dir))[0], ref)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mixer", ["retnet", "gla", "gated_deltanet", "mamba2", "hgrn2"])
def test_final_state_is_affine_in_the_initial_state(mixer, device):
    """What cp builds on: the probe's S_final(0) and P give the mixer's own final state from a random initial
    state (on CUDA through fla's kernels, float32)."""
    model = tiny_model(mixer).to(device)
    mix = model.layers[0].mixer
    torch.manual_seed(1)
    x = torch.randn(2, 24, model.cfg.hidden_size, device=device)
    carried = {k: torch.randn_like(v) for k, v in mix.init_state(2, device).items() if k.startswith("conv_")}
    if "pos" in mix.state_spec():
        carried["pos"] = torch.tensor([5, 0], device=device)
    with torch.no_grad():
        s0, P = final_state_and_transition(mix, mix.forward, x, carried)
        start = torch.randn_like(s0)
        _, st = mix(x, state={**mix.init_state(2, device), **carried, "recurrent": start})
    tol = 1e-5 if device == "cpu" else 2e-3  # fla's kernels accumulate chunk products in tf32 / bf16 dots
    torch.testing.assert_close(P @ start + s0, st["recurrent"], rtol=tol, atol=tol)
