"""linear_moe.ops.autotune: which Triton configs a limited autotuner keeps (checked on stand-in configs)."""

from types import SimpleNamespace

import pytest

from linear_moe.ops.autotune import limit_autotune, pick_configs


def cfg(bv: int, stages: int, warps: int):
    return SimpleNamespace(kwargs={"BV": bv}, num_stages=stages, num_warps=warps)


# fla's chunk_gated_delta_rule_fwd_h list: warps x stages x BV (12 configs)
CONFIGS = [cfg(bv, s, w) for w in (2, 4) for s in (2, 3, 4) for bv in (32, 64)]


def key(c):
    return (c.kwargs["BV"], c.num_stages, c.num_warps)


def test_full_keeps_all_in_order():
    assert pick_configs(CONFIGS, "full") == CONFIGS


def test_one_keeps_the_smallest():
    assert [key(c) for c in pick_configs(CONFIGS, "one")] == [(32, 2, 2)]


def test_few_keeps_the_quartiles_by_resources():
    ordered = sorted(CONFIGS, key=key)  # BV, then stages, then warps: the resource order for one int kwarg
    assert [key(c) for c in pick_configs(CONFIGS, "few")] == [key(ordered[i]) for i in (3, 6, 9)]


def test_few_on_short_lists_keeps_distinct_configs():
    two = [cfg(64, 3, 4), cfg(32, 2, 4)]
    assert [key(c) for c in pick_configs(two, "few")] == [(32, 2, 4), (64, 3, 4)]
    assert pick_configs(two[:1], "one") == two[:1]


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="full, few, one"):
        limit_autotune("fast")


def test_kernel_pruning_sees_the_full_list_before_the_pick():
    # fla's GLA backward prunes tiles as large as the head dim unless they are the smallest on the list: picking
    # first and pruning after could leave nothing (Triton's AutotunerError), pruning first never does
    from linear_moe.ops import autotune

    def prune_like_fla(configs, nargs, **kwargs):
        smallest = min(c.kwargs["BV"] for c in configs)
        return [c for c in configs if c.kwargs["BV"] < kwargs["V"] or c.kwargs["BV"] == smallest]

    configs = [cfg(bv, s, 4) for bv in (32, 64, 128) for s in (2, 3)]
    old = autotune._mode
    try:
        autotune._mode = "few"
        kept = autotune.pick_after(prune_like_fla)(configs, {}, V=128)  # keeps BV 32, 64
        assert [key(c) for c in kept] == [(32, 3, 4), (64, 2, 4), (64, 3, 4)]
        autotune._mode = "one"
        assert [key(c) for c in autotune.pick_after(prune_like_fla)(configs, {}, V=64)] == [(32, 2, 4)]
    finally:
        autotune._mode = old
