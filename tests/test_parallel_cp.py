"""Context parallelism (parallel/cp.py) on gloo: losses and first-step gradients of a few AdamW steps match one
process, packed documents crossing the ranks' slices, for every kind of state cp carries: scalar decay with RoPE
offsets (retnet), vector decays (gla, hgrn's vector state), short-conv and token-shift windows (gla, hgrn, rebased,
rwkv6, rwkv7), feature-mapped sums with a normalizer (based, rebased), delta rules (gated_deltanet with softmax
attention, rwkv7 with v_first of layer 0); cp=4 folds transitions across ranks; every mixer's declared kinds are
checked against its own final state."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from dist_pool import dist_pool, grad_error, packed_batches, tiny_model, train_reference
from linear_moe.mixers import MIXERS, MixerContext
from linear_moe.parallel.cp import (
    apply_cp,
    apply_transition,
    check_supported,
    cp_layout,
    final_state_and_transition,
    shard_batch,
)

ROW = 48


def _row(ids, labels, cu, d):
    """Row d of a packed batch of rows (a document boundary at every row start)."""
    a, b = d * ROW, (d + 1) * ROW
    local = [c - a for c in cu.tolist() if a <= c <= b]
    return ids[:, a:b], labels[:, a:b], torch.tensor(local, dtype=cu.dtype)


def cp_job(
    mixer: str, pattern: str | None, dp: int, kwargs: dict, dtype: torch.dtype = torch.float32
) -> tuple[list[float], list[float], float]:
    """dp x cp ranks (each dp rank one row, split over cp), 3 AdamW steps: (reference losses, parallel losses, the
    first step's gradient error)."""
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "cp"))
    batches = packed_batches(3, rows=dp, row_len=ROW)
    ref_losses, ref_grads = train_reference(tiny_model(mixer, pattern, **kwargs).to(dtype), batches)
    model = tiny_model(mixer, pattern, **kwargs).to(dtype)
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
    "hgrn-conv": ("hgrn", None, {"use_short_conv": True}),  # a vector state (element-wise decay), short convs
    "based": ("based", None, {}),  # feature-mapped keys: the state and the normalizer (running sums)
    # float64: ReBased's normaliser phi(q).z amplifies float32 rounding (first-step gradients of cp and one process
    # ~1e-4 apart in float32, 1e-15 in float64)
    "rebased-conv": ("rebased", None, {"use_short_conv": True}, torch.float64),
    "rwkv6": ("rwkv6", None, {}),  # token shift: the previous rank's last token
    "rwkv7": ("rwkv7", None, {}),  # generalised delta rule, token shift, v_first of layer 0 in layer 1
}


# first-step gradients, relative to each tensor's largest entry: float32 sums over the tokens reordered by the
# split; Gated DeltaNet's A_log / dt_bias gradients (largest entry ~6e-4, many cancelling terms) reach 1.1e-5
GRAD_TOL = 2e-5


@pytest.mark.parametrize("case", list(CASES))
def test_cp_matches_one_process(case):
    for ref, got, diff in dist_pool(2).run(cp_job, *CASES[case][:2], 1, *CASES[case][2:]):
        assert got == pytest.approx(ref, rel=1e-5)
        assert diff < GRAD_TOL


@pytest.mark.parametrize("case", ["rwkv7", "hgrn-conv"])
def test_cp4_folds_the_transitions_of_earlier_ranks(case):
    """cp=4 (12 tokens a rank): a document spans whole ranks, so a rank's initial state is the earlier ranks'
    final states folded through their transitions (a matrix for RWKV-7, a diagonal for HGRN)."""
    batches = packed_batches(3, rows=1, row_len=ROW)
    assert any(len(cp_layout(cu.tolist(), ROW, 1, 0, 4).chain(r)) > 1 for _, _, cu in batches for r in range(4))
    for ref, got, diff in dist_pool(4).run(cp_job, *CASES[case][:2], 1, *CASES[case][2:]):
        assert got == pytest.approx(ref, rel=1e-5)
        assert diff < GRAD_TOL


def test_cp_times_dp_matches_one_process():
    for ref, got, diff in dist_pool(4).run(cp_job, "gated_deltanet", "LN", 2, {}):
        assert got == pytest.approx(ref, rel=1e-5)
        assert diff < GRAD_TOL


def test_cp_layout_by_hand():
    # 4 ranks of 12 tokens, documents [0, 13), [13, 40), [40, 48)
    lay = cp_layout([0, 13, 40, 48], 48, 1, 2, 4)
    assert lay.continues == [False, True, True, True]
    assert lay.single == [True, False, True, False]
    assert lay.first_offset == [0, 12, 11, 23]
    assert lay.last_offset == [0, 0, 11, 0] and lay.last_len == [12, 11, 12, 8]
    assert lay.chain(2) == [1] and lay.chain(3) == [1, 2] and lay.chain(1) == [0]


def test_cp_refuses_states_it_cannot_carry():
    mixer = tiny_model("gla").layers[0].mixer
    spec = mixer.state_spec()
    for changes, why in (
        ({"kind": None}, "'recurrent': its StateSpec declares no kind"),
        ({"kind": "cache"}, "'recurrent': a KV cache is exchanged only for the softmax Attention mixer"),
        ({"kind": "matrix", "shape": (64,)}, r"'recurrent': a 'matrix' state needs a shape \[..., K, V\], got \[64\]"),
        ({"kind": "window", "window": 0}, "'recurrent': a 'window' state needs window >= 1, got 0"),
    ):
        mixer.state_spec = lambda changes=changes: {"recurrent": dataclasses.replace(spec["recurrent"], **changes)}
        with pytest.raises(ValueError, match=f"mixer GatedLinearAttention keeps state that cp cannot carry \\({why};"):
            check_supported(mixer)
    for name in MIXERS:  # every built-in mixer declares states cp carries
        check_supported(tiny_model(name).layers[0].mixer)


def test_cp_through_the_trainer_matches_one_process(tmp_path_factory):
    """cp=2 on 2 ranks through the Trainer (FSDP2 over the cp ranks, MoE statistics summed over them)."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gdn-v2-hybrid", tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("gdn-cp")
    assert_matches(dist_pool(2).run(train_job, "gdn-v2-hybrid", {"cp": 2, "dp_shard": 1}, str(run_dir))[0], ref)


def test_cp_sequence_wise_balance_matches_one_process(tmp_path_factory):
    """DeepSeek-V3 MoE with the sequence-wise balance loss under cp=2 through the Trainer, 3 rows of 16 tokens a
    micro-batch: the middle row is split over the two ranks, whose expert counts and probability sums of each row
    are summed (the probabilities' with their gradients) before the loss."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gla-v3", tmp_path_factory, rows=3)
    run_dir = tmp_path_factory.mktemp("gla-v3-cp")
    got = dist_pool(2).run(train_job, "gla-v3", {"cp": 2, "dp_shard": 1}, str(run_dir), None, 3)[0]
    assert_matches(got, ref)


LINEAR_MIXERS = ["retnet", "gla", "gated_deltanet", "mamba2", "hgrn2", "based", "rebased", "rwkv6", "rwkv7", "hgrn"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mixer", LINEAR_MIXERS)
def test_final_state_is_affine_in_the_initial_state(mixer, device):
    """What cp builds on, and the check of every mixer's declared StateSpec kinds: the probe's S_final(0) and
    transition give the mixer's own final states from random initial states (on CUDA through fla's kernels,
    float32)."""
    model = tiny_model(mixer).to(device)
    mix = model.layers[1].mixer  # (RWKV-7: a layer that mixes in v_first)
    spec = mix.state_spec()
    torch.manual_seed(1)
    x = torch.randn(2, 24, model.cfg.hidden_size, device=device)
    carried = {k: torch.randn_like(v) for k, v in mix.init_state(2, device).items() if spec[k].kind == "window"}
    if "pos" in spec:
        carried["pos"] = torch.tensor([5, 0], device=device)
    context = MixerContext(v_first=torch.randn(2, 24, mix.value_dim, device=device)) if mixer == "rwkv7" else None
    with torch.no_grad():
        pairs = final_state_and_transition(mix, mix.forward, x, carried, context=context)
        start = {k: torch.randn_like(s0) for k, (s0, _) in pairs.items()}
        _, st = mix(x, state={**mix.init_state(2, device), **carried, **start}, context=context)
    assert pairs.keys() == {k for k, s in spec.items() if s.kind in ("matrix", "diagonal")} != set()
    tol = 1e-5 if device == "cpu" else 2e-3  # fla's kernels accumulate chunk products in tf32 / bf16 dots
    for k, (s0, T) in pairs.items():
        got = apply_transition(spec[k], T, start[k]) + s0
        torch.testing.assert_close(got, st[k], rtol=tol, atol=tol)
