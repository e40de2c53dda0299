"""Tensor parallelism (parallel/tp.py) on gloo, tp=2: losses of a few AdamW steps, the first step's gradients and
the final parameters match one process for every mixer family with a tp plan (gated_deltanet in an MoE hybrid
stack; Mamba2 with shared and with split B/C groups, also at tp=4 and with norm groups straddling ranks) and for tied
embeddings; each rank's heads get their own decays; what tp cannot split is refused with one line."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from dist_pool import dist_pool, grad_error, packed_batches, tiny_model, train_reference
from linear_moe.parallel.tp import apply_tp, check_tp, loss_context


def tp_model(mixer: str, pattern: str | None, preset: str, kwargs: dict, overrides: dict, dtype: str):
    """`tiny_model` (seed 0) in `dtype`, its config changed by `overrides` (e.g. tied embeddings, other sizes)."""
    from linear_moe.model import LinearMoEForCausalLM, get_preset

    cfg = get_preset(preset).replace(mixer=mixer, num_layers=2, layer_pattern=pattern, mixer_kwargs=kwargs)
    torch.manual_seed(0)
    return LinearMoEForCausalLM(cfg.replace(**overrides)).to(getattr(torch, dtype))


def tp_job(
    mixer: str, pattern: str | None, preset: str, kwargs: dict, overrides: dict | None = None, dtype: str = "float32"
) -> tuple[list[float], list[float], float, dict, dict]:
    """3 AdamW steps with tp over every rank: (reference losses, tp losses, the first step's gradient error, the
    final parameters (made whole), the reference's). lr 1e-3: at 1e-2 AdamW's first steps (updates of +-lr whatever
    the gradient's size) amplify float32 rounding to 1e-5 in the third loss of some mixers (rwkv6)."""
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),), mesh_dim_names=("tp",))
    batches = packed_batches(3)
    lr, overrides = 1e-3, overrides or {}
    ref_model = tp_model(mixer, pattern, preset, kwargs, overrides, dtype)
    ref_losses, ref_grads = train_reference(ref_model, batches, lr)
    model = tp_model(mixer, pattern, preset, kwargs, overrides, dtype)
    apply_tp(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
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
    params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
    return ref_losses, losses, grad_error(grads, ref_grads), params, dict(ref_model.named_parameters())


def assert_tp_matches(results: list) -> None:
    """Float32 sums in another order: losses to 1e-5, gradients to 1e-5 of each tensor's largest entry, parameters
    after 3 steps as the dp / ep tests (Adam's normalised steps amplify the rounding a little)."""
    for ref, got, err, params, ref_params in results:
        assert got == pytest.approx(ref, rel=1e-5)
        assert err < 1e-5
        assert params.keys() == ref_params.keys()
        for name, value in ref_params.items():
            torch.testing.assert_close(params[name], value.detach(), rtol=1e-4, atol=2e-5, msg=name)


# every mixer family with a tp plan, with the options that exercise its parts (short convs, gates, GQA, norms over
# all heads, shared feature maps and low-rank gates, the forget-gate floor of layer 1); debug-dense: 4 heads
CASES = {
    "attention": ("attention", None, "debug-dense", {}),
    "retnet-gqa": ("retnet", None, "debug-dense", {"num_kv_heads": 2, "use_short_conv": True}),
    "gla": ("gla", None, "debug-dense", {"use_short_conv": True}),
    "lightning-per-head": ("lightning_attn", None, "debug-dense", {"norm_per_head": True}),
    "lightning-all-heads": ("lightning_attn", None, "debug-dense", {}),
    "linear-attn": ("linear_attn", None, "debug-dense", {"do_feature_map_norm": True, "use_short_conv": True}),
    "based": ("based", None, "debug-dense", {"feature_dim": 8}),
    # float64: ReBased's normaliser (q'.k')^2 summed over a document's keys is as small as 1e-4 at a document's first
    # tokens, which turns float32 rounding into 1e-4 gradient differences
    "rebased": ("rebased", None, "debug-dense", {"feature_dim": 8}, {}, "float64"),
    "deltanet": ("deltanet", None, "debug-dense", {"use_gate": True}),
    "gdn-moe-hybrid": ("gated_deltanet", "LN", "debug-qwen2-moe", {}),
    "hgrn": ("hgrn", None, "debug-dense", {"use_short_conv": True}),
    "hgrn2": ("hgrn2", None, "debug-dense", {"use_short_conv": True}),
    "rwkv6": ("rwkv6", None, "debug-dense", {}),
    "rwkv7": ("rwkv7", None, "debug-dense", {}),
    # float64, as the Mamba2 cases below: the gradients of A_log and dt_bias (sums over the tokens of terms of both
    # signs) carry float32 rounding of up to 2e-5 of their largest entry in one process alone (measured against a
    # float64 run), where tp's own difference is of that size too
    # n_groups=1 < tp: B/C and their convs shared, the norm's one group over all heads spans the ranks
    "mamba2-shared-bc": ("mamba2", None, "debug-dense", {"state_size": 16}, {}, "float64"),
    # n_groups=2: B/C split with the groups, each norm group on one rank; the gate after the norm, D per channel
    "mamba2-split-bc": (
        "mamba2",
        None,
        "debug-dense",
        {"state_size": 16, "n_groups": 2, "norm_before_gate": True, "D_has_hdim": True, "use_bias": True},
        {},
        "float64",
    ),
}
# tp over 4 ranks (n_groups=2: each norm group spans 2 ranks); 6 heads in 3 groups over 2 ranks (B/C shared, a rank's
# channels straddle norm groups: rank 0 holds group 0 and half of group 1)
MAMBA2_CASES = {
    "tp4-groups-span-2-ranks": (4, ("mamba2", None, "debug-dense", {"state_size": 16, "n_groups": 2}, {}, "float64")),
    "tp2-groups-straddle": (
        2,
        (
            "mamba2",
            None,
            "debug-dense",
            {"state_size": 16, "n_groups": 3},
            {"hidden_size": 48, "num_heads": 6},
            "float64",
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tp_matches_one_process(case):
    assert_tp_matches(dist_pool(2).run(tp_job, *CASES[case]))


@pytest.mark.parametrize("case", list(MAMBA2_CASES))
def test_tp_mamba2_norm_groups_across_ranks_match_one_process(case):
    tp, args = MAMBA2_CASES[case]
    assert_tp_matches(dist_pool(tp).run(tp_job, *args))


def test_tp_tied_embeddings_match_one_process():
    """The vocab-parallel embedding and the column-parallel head share one DTensor weight split on the vocabulary."""
    assert_tp_matches(dist_pool(2).run(tp_job, "gla", None, "debug-dense", {}, {"tie_embeddings": True}))


def test_tp_head_offsets_pick_each_ranks_decays():
    """RetNet's and lightning attention's per-head decays on a rank are those of its heads in the whole layer."""
    from linear_moe.mixers.lightning_attn import LightningAttention
    from linear_moe.mixers.retnet import MultiScaleRetention

    for cls in (MultiScaleRetention, LightningAttention):
        whole = cls(64, 8, layer_idx=1, **({"num_layers": 3} if cls is LightningAttention else {}))
        full = whole.log_decay()
        assert len(set(full.tolist())) == 8  # every head decays differently
        whole.num_heads, whole.head_offset = 2, 4  # heads 4, 5 of 8 (rank 2 of tp=4)
        assert torch.equal(whole.log_decay(), full[4:6])


def _mutate(model, how: str):
    mixer = model.layers[1].mixer
    if how == "custom":
        mixer.__class__ = type("CustomMixer", (type(mixer),), {})
    elif how == "extra-param":
        mixer.extra = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize(
    ("mixer", "tp", "how", "match"),
    [
        ("gla", 2, "custom", "CustomMixer has no tp plan"),
        ("gla", 2, "extra-param", r"GatedLinearAttention.extra has no placement"),
        ("hgrn2", 3, None, "num_heads=4 is not divisible by tp=3"),
        ("mamba2", 3, None, "num_heads=4 is not divisible by tp=3"),
        ("hgrn", 3, None, "input_dim=64 is not divisible by tp=3"),
    ],
)
def test_tp_refusals(mixer, tp, how, match):
    model = tiny_model(mixer)
    _mutate(model, how)
    with pytest.raises(ValueError, match=match):
        check_tp(model, tp)
