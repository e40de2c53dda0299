"""Tensor parallelism (parallel/tp.py) on gloo, tp=2: losses of a few AdamW steps and the first step's gradients
match one process, for softmax attention, a vector-decay (gla), a scalar-decay (lightning_attn, per-head norm) and a
delta-rule mixer (gated_deltanet) in an MoE hybrid stack; what tp cannot split is refused with one line."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dist_pool import dist_pool, grad_error, packed_batches, tiny_model, train_reference
from linear_moe.parallel.tp import apply_tp, check_tp, loss_context


def tp_job(mixer: str, pattern: str | None, preset: str, kwargs: dict) -> tuple[list[float], list[float], float]:
    """3 AdamW steps with tp over every rank: (reference losses, tp losses, the first step's gradient error)."""
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("tp",))
    batches = packed_batches(3)
    ref_losses, ref_grads = train_reference(tiny_model(mixer, pattern, preset, **kwargs), batches)
    model = tiny_model(mixer, pattern, preset, **kwargs)
    apply_tp(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], {}
    for ids, labels, cu in batches:
        with loss_context(model):
            out = model(ids, labels=labels, cu_seqlens=cu)
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
            loss.backward()
        for p in model.parameters():  # partial sums -> the parameter's placement (FSDP2 does this in training)
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(placements=p.placements)
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return ref_losses, losses, grad_error(grads, ref_grads)


CASES = {
    "attention": ("attention", None, "debug-dense", {}),
    "gla": ("gla", None, "debug-dense", {"use_short_conv": True}),
    "lightning": ("lightning_attn", None, "debug-dense", {"norm_per_head": True}),
    "gdn-moe-hybrid": ("gated_deltanet", "LN", "debug-qwen2-moe", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tp_matches_one_process(case):
    for ref, got, err in dist_pool(2).run(tp_job, *CASES[case]):
        assert got == pytest.approx(ref, rel=1e-5)
        assert err < 1e-5


@pytest.mark.parametrize(
    ("mixer", "kwargs", "tie", "match"),
    [
        ("retnet", {}, False, "per-head decays"),
        ("lightning_attn", {}, False, "norm_per_head"),
        ("hgrn", {}, False, "no tp plan"),
        ("gla", {}, True, "tied embeddings"),
    ],
)
def test_tp_refusals(mixer, kwargs, tie, match):
    model = tiny_model(mixer, **kwargs)
    model.cfg = model.cfg.replace(tie_embeddings=tie)
    with pytest.raises(ValueError, match=match):
        check_tp(model, 2)


def test_tp_through_the_trainer_matches_one_process(tmp_path_factory):
    """tp x ep x dp_shard on 4 ranks through the Trainer (experts split over ep, FSDP2 on top)."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gdn-v2-hybrid", tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("gdn-tp-ep")
    assert_matches(dist_pool(4).run(train_job, "gdn-v2-hybrid", {"tp": 2, "ep": 2}, str(run_dir))[0], ref)
