"""Expert tensor parallelism (parallel/tp.py, MoE section) on gloo: under tp=2 every MoE layer holds a slice of every
expert's width (w13 as a strided shard of matching gate and up columns, w2 split on its rows, shared experts as a
dense FFN) and reduce-scatters its partial output; a few AdamW steps follow one process (losses, aux losses,
gradient norms, expert loads, capacity drops, aux-free biases, parameters) for routed + shared experts, with a
capacity limit that drops and with chunked expert recomputation; through the Trainer, DCP checkpoints written at
tp=2 resume in one process and the other way round, and on 4 ranks tp=2 x dp_shard=2 (with and without ep=2) follows
one process and resumes in one; `expert_tp=False` keeps the layers replicated; the layout's errors are one line; the
option round-trips YAML."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from dist_pool import dist_pool, packed_batches

STEPS, LR = 3, 1e-3  # at 1e-2 Adam's first steps turn float32 rounding of near-zero gradients into 1e-5
CASES = {  # MoE family of the debug preset (8 experts, top-2, F=32), MoE overrides, expert recompute chunk
    # softmax router, routed + one sigmoid-gated shared expert (width 128), balance loss
    "qwen2-moe": ("qwen2-moe", {"z_loss_coef": 1e-3}, 0),
    # a capacity limit that drops (the same drops on both tp ranks: each routes the whole sequence)
    "qwen2-moe-capacity": ("qwen2-moe", {"capacity_factor": 0.75}, 0),
    # sigmoid router, group-limited, aux-free bias, sequence-wise balance, one shared expert; experts in chunks
    "deepseek-v3-chunks": ("deepseek-v3", {"balance_coef": 0.01}, 24),
    # device-level balance, two shared experts fused (width 64)
    "deepseek-v2": ("deepseek-v2", {}, 0),
}


def moe_model(family: str, moe_kwargs: dict, chunk: int = 0):
    """A 2-layer GLA debug model of `family` (DeepSeek: layer 0 dense, layer 1 MoE), from seed 0."""
    from linear_moe.model import LinearMoEForCausalLM, get_preset
    from linear_moe.parallel.checkpointing import apply_expert_checkpointing

    cfg = get_preset(f"debug-{family}").replace(mixer="gla", num_layers=2)
    cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, **moe_kwargs))
    torch.manual_seed(0)
    model = LinearMoEForCausalLM(cfg)
    if chunk:
        apply_expert_checkpointing(model, chunk)
    return model


def train(model, batches) -> dict:
    """AdamW steps on whole packed batches with the aux-free bias update after each: per step the loss, aux loss,
    gradient norm, expert loads and drops; the first step's gradients; then the whole parameters and buffers."""
    from linear_moe.parallel.checkpointing import moe_layers
    from linear_moe.parallel.grads import clip_grad_norm_
    from linear_moe.parallel.tp import loss_context

    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out_ = {k: [] for k in ("loss", "aux", "grad_norm", "load", "dropped")}
    whole = {}
    for ids, labels, cu in batches:
        with loss_context(model):
            out = model(ids, labels=labels, cu_seqlens=cu)
            (out.loss + out.aux_loss).backward()
        for p in model.parameters():  # partial sums -> the parameter's placement (FSDP2 does this in training)
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(placements=p.placements)
        out_["grad_norm"].append(float(clip_grad_norm_(model.parameters(), math.inf)))
        whole = whole or {n: _whole(p.grad) for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        for layer, load_E in zip(moe_layers(model), out.expert_load, strict=True):
            layer.update_bias(load_E)
        out_["loss"].append(float(out.loss.detach()))
        out_["aux"].append(float(out.aux_loss.detach()))
        out_["load"].append(out.expert_load.tolist())
        out_["dropped"].append(out.expert_dropped.tolist())
    out_["grads"] = whole
    out_["state"] = {n: _whole(t) for n, t in model.state_dict().items()}
    return out_


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def expert_tp_job(case: str, expert_tp: bool = True) -> tuple[dict, dict, dict]:
    """(one process, tp over every rank, this rank's MoE placements and local shapes) for `case`."""
    from linear_moe.parallel.tp import apply_tp

    family, moe_kwargs, chunk = CASES[case]
    batches = packed_batches(STEPS, rows=2, row_len=32)
    ref = train(moe_model(family, moe_kwargs, chunk), batches)
    model = moe_model(family, moe_kwargs, chunk)
    apply_tp(model, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)), expert_tp)
    moe = model.moe_layers()[-1]
    layout = {n: (tuple(p.placements), tuple(p.to_local().shape)) for n, p in moe.named_parameters()}
    return ref, train(model, batches), layout


def assert_follows(got: dict, ref: dict) -> None:
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["aux"] == pytest.approx(ref["aux"], rel=1e-5, abs=1e-8)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert got["load"] == ref["load"]  # every rank routes the whole sequence: the one-process counts, not doubled
    assert got["dropped"] == ref["dropped"]
    for name, g in ref["grads"].items():  # the first step's gradients, relative to each tensor's largest entry
        assert (got["grads"][name] - g).abs().max() <= 1e-5 * g.abs().max(), name
    assert got["state"].keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        # atol LR / 10: Adam moves a weight by ~LR per step whatever its gradient's size, so reordered float32 sums
        # of a near-zero gradient show as weight differences of a few 1e-5 (2.4e-5 seen); a wrong gradient, ~LR
        torch.testing.assert_close(got["state"][name], value, rtol=1e-4, atol=LR / 10, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_expert_tp_follows_one_process(case):
    for ref, got, layout in dist_pool(2).run(expert_tp_job, case):
        assert_follows(got, ref)
        if case == "qwen2-moe-capacity":
            assert all(sum(d) > 0 for d in ref["dropped"])  # the limit bites at every step
        family, *_ = CASES[case]
        E, D, F = 8, 64, 32
        assert layout["experts.w13"] == ((_StridedShard(2, split_factor=2),), (E, D, F))  # gate_r | up_r, F/2 each
        assert layout["experts.w2"] == ((Shard(1),), (E, F // 2, D))
        assert layout["router.weight"] == ((Replicate(),), (E, D))
        shared = 128 if family == "qwen2-moe" else 64 if family == "deepseek-v2" else 32
        assert layout["shared_experts.gate_proj.weight"] == ((Shard(0),), (shared // 2, D))
        assert layout["shared_experts.down_proj.weight"] == ((Shard(1),), (D, shared // 2))


def test_replicated_moe_layers_follow_one_process():
    """`expert_tp=False`: every tp rank runs the whole MoE layer (replicated weights) and keeps its output slice."""
    for ref, got, layout in dist_pool(2).run(expert_tp_job, "qwen2-moe", False):
        assert_follows(got, ref)
        assert layout["experts.w13"] == ((Replicate(),), (8, 64, 64))


def unplaced_job() -> str:
    """apply_tp on a MoE layer with a parameter MOE_TP does not place: the error line."""
    from linear_moe.parallel.tp import apply_tp

    model = moe_model("qwen2-moe", {})
    model.layers[1].ffn.extra = torch.nn.Parameter(torch.zeros(3))
    try:
        apply_tp(model, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)))
    except ValueError as e:
        return str(e)
    return ""


def test_expert_tp_errors_and_option(tmp_path):
    """Widths tp does not divide and unplaced MoE parameters are one-line errors naming the fix; the option
    round-trips through YAML and shows in the layout line."""
    from linear_moe.config import ConfigError, apply_overrides, load_yaml, save_yaml
    from linear_moe.parallel.config import ParallelConfig, check_layout
    from linear_moe.parallel.tp import check_expert_tp, summed_over_tp
    from linear_moe.train.config import RunConfig

    model = moe_model("qwen2-moe", {"expert_ffn_hidden_size": 30})  # shared width stays 4x: 120
    with pytest.raises(
        ConfigError,
        match=r"parallel.tp=4 must divide model.moe.expert_ffn_hidden_size=30 .*"
        "or set parallel.expert_tp=false",
    ):
        check_layout(ParallelConfig(tp=4), 4, model.cfg, 64)
    with pytest.raises(ValueError, match="model.moe.expert_ffn_hidden_size=30 is not divisible by tp=4"):
        check_expert_tp(model, 4)
    shared_66 = moe_model("deepseek-v2", {"shared_expert_ffn_hidden_size": 66}).cfg
    with pytest.raises(ConfigError, match="parallel.tp=4 must divide model.moe.shared_expert_ffn_hidden_size=66"):
        check_layout(ParallelConfig(tp=4), 4, shared_66, 64)
    assert check_layout(ParallelConfig(tp=4, expert_tp=False), 4, model.cfg, 64).describe() == (
        "tp=4 expert_tp=false (world 4)"
    )
    assert [p.shape for p in summed_over_tp(model.layers[1], 2)][-2:] == [(8, 64), (1, 64)]  # router, shared gate

    assert dist_pool(2).run(unplaced_job)[0] == (
        "tensor parallel: MoE parameter extra has no placement (parallel/tp.py MOE_TP); add it there or set "
        "parallel.expert_tp=false"
    )
    run = apply_overrides(RunConfig(), ["parallel.tp=2", "parallel.expert_tp=false"])
    assert run.parallel.expert_tp is False
    save_yaml(run, tmp_path / "run.yaml")
    assert load_yaml(tmp_path / "run.yaml", RunConfig) == run
    assert "expert_tp: false" in (tmp_path / "run.yaml").read_text()


def w13_blocks(step_dir: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of the blocks of layer 1's w13 that a DCP checkpoint stores, sorted."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata["model.layers.1.ffn.experts.w13"]
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)


def test_checkpoints_move_between_tp_and_one_process(tmp_path_factory):
    """Through the Trainer (DeepSeek-V3 MoE: shared expert, aux-free bias, sequence-wise balance): tp=2 with expert
    tp follows one process; one process resumes tp=2's step-2 checkpoint (w13 written from strided shards) and tp=2
    resumes one process's; both end where one process ends."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gla-v3", tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("gla-v3-tp")
    assert_matches(dist_pool(2).run(train_job, "gla-v3", {"tp": 2}, str(run_dir))[0], ref)
    # w13 [E=4, D=32, 2F=32]: each rank's strided gate | up columns stored as one plain block of 16 columns
    assert w13_blocks(run_dir / "checkpoints" / "step-0000002") == [((0, 0, 0), (4, 32, 16)), ((0, 0, 16), (4, 32, 16))]
    one = train_job(
        "gla-v3", {}, str(tmp_path_factory.mktemp("one-from-tp")), str(run_dir / "checkpoints" / "step-0000002")
    )
    assert one["loss"] == pytest.approx(ref["loss"][2:], rel=1e-5)
    torch.testing.assert_close(one["state"], ref["state"], rtol=1e-4, atol=2e-5)
    step2 = str(ref["run_dir"] / "checkpoints" / "step-0000002")
    tp = dist_pool(2).run(train_job, "gla-v3", {"tp": 2}, str(tmp_path_factory.mktemp("tp-from-one")), step2)[0]
    assert tp["loss"] == pytest.approx(ref["loss"][2:], rel=1e-5)
    torch.testing.assert_close(tp["state"], ref["state"], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("layout", [{"tp": 2, "ep": 2}, {"tp": 2}], ids=["tp2-ep2-dp2", "tp2-dp2"])
def test_four_ranks_follow_one_process_and_their_checkpoint_resumes_in_one(layout, tmp_path_factory):
    """On 4 ranks through the Trainer, FSDP over dp_shard=2: tp=2 x ep=2 (each rank: 2 of 4 experts, half of each
    one's width) and tp=2 (experts FSDP-sharded on E, half of each one's width) follow one process, and one process
    resumes their step-2 checkpoints (w13 from [Shard(0), strided] shards)."""
    from test_parallel_dp_ep import assert_matches, reference, train_job

    ref = reference("gdn-v2-hybrid", tmp_path_factory)
    run_dir = tmp_path_factory.mktemp("gdn-tp-4")
    assert_matches(dist_pool(4).run(train_job, "gdn-v2-hybrid", layout, str(run_dir))[0], ref)
    step2 = run_dir / "checkpoints" / "step-0000002"
    # 2 experts x 16 of the 32 gate | up columns in each block (ep or FSDP on E, tp on the width)
    assert w13_blocks(step2) == [((e, 0, c), (2, 32, 16)) for e in (0, 2) for c in (0, 16)]
    one = train_job("gdn-v2-hybrid", {}, str(tmp_path_factory.mktemp("one-from-tp-4")), str(step2))
    assert one["loss"] == pytest.approx(ref["loss"][2:], rel=1e-5)
    torch.testing.assert_close(one["state"], ref["state"], rtol=1e-4, atol=2e-5)
