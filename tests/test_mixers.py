"""The mixer contract (mixers/base.py), checked for every mixer in MIXERS on CPU in float64:
split sequences with carried state, packed documents (cu_seqlens), step-by-step decoding, gradients, bad input.
Plus hand checks of retnet, gla, lightning_attn, based, rebased, linear_attn and attention against formulas
written here. (Recurrent mixers' own hand checks: tests/test_mixers_recurrent.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

from linear_moe.mixers import MIXERS, build_mixer

D, H = 32, 2
NAMES = list(MIXERS)
ATOL, RTOL = 1e-9, 1e-7


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(name: str, **opts) -> torch.nn.Module:
    """A float64 layer with every parameter perturbed, so zero-initialised weights (gates, o_proj, ...) matter."""
    m = build_mixer(name, D, H, layer_idx=opts.pop("layer_idx", 1), **opts).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def doc_state(state: dict, n: int) -> dict:
    """Row `n` of a state, as a batch of one; attention's padded KV slots (`valid` False) are dropped."""
    if "valid" in state:
        keep = state["valid"][n]
        return {k: state[k][n: n + 1][:, :, keep] for k in ("k", "v")}
    return {k: s[n: n + 1] for k, s in state.items()}


def states_close(a: dict, b: dict) -> None:
    a, b = doc_state(a, 0) if "valid" in a else a, doc_state(b, 0) if "valid" in b else b
    assert set(a) == set(b)
    for k in a:
        close(a[k].double(), b[k].double())


def stack_states(states: list[dict]) -> dict:
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}


# ---------------------------------------------------------------- the contract, for every mixer


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_two_pieces_with_state_equal_whole(name, recurrent):
    m = build(name).train(not recurrent)  # eval + a state + short input -> fused_recurrent kernels
    x = torch.randn(2, 45, D, dtype=torch.float64)
    y, s = m(x, use_cache=True)
    y1, s1 = m(x[:, :19], use_cache=True)
    y2, s2 = m(x[:, 19:], state=s1)
    close(torch.cat([y1, y2], 1), y)
    states_close(s2, s)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_packed_documents_equal_separate_runs(name):
    m = build(name).train()
    lens = [13, 29, 7]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    docs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    y, s = m(torch.cat(docs, 1), cu_seqlens=cu, use_cache=True)
    y_sep, s_sep = zip(*(m(d, use_cache=True) for d in docs), strict=True)
    close(y, torch.cat(y_sep, 1))
    for n in range(len(lens)):
        states_close(doc_state(s, n), s_sep[n])
    # Continue every document from its own state, packed again (lengths differ from the prefixes).
    more = [torch.randn(1, n, D, dtype=torch.float64) for n in (5, 2, 11)]
    cu2 = torch.tensor([0, 5, 7, 18])
    y2, s2 = m(torch.cat(more, 1), state=s, cu_seqlens=cu2)
    y2_sep, s2_sep = zip(*(m(d, state=st) for d, st in zip(more, s_sep, strict=True)), strict=True)
    close(y2, torch.cat(y2_sep, 1))
    for n in range(len(lens)):
        states_close(doc_state(s2, n), s2_sep[n])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_step_by_step_decoding_equals_full_forward(name):
    m = build(name).eval()
    x = torch.randn(2, 16, D, dtype=torch.float64)
    y_full, s_full = m(x, use_cache=True)
    y_pre, s = m(x[:, :9], use_cache=True)
    ys = [y_pre]
    for t in range(9, 16):
        y_t, s = m(x[:, t: t + 1], state=s)
        ys.append(y_t)
    close(torch.cat(ys, 1), y_full)
    states_close(s, s_full)


@pytest.mark.parametrize("name", NAMES)
def test_backward_gives_finite_gradients_to_every_parameter(name):
    m = build(name).train()
    x = torch.randn(2, 21, D, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("name", NAMES)
def test_sequence_flops_positive_and_nondecreasing(name):
    m = build_mixer(name, D, H)
    f = [m.sequence_flops(n) for n in (1, 64, 4096)]
    assert all(math.isfinite(v) and v > 0 for v in f) and f[0] <= f[1] <= f[2]


def test_unknown_mixer_name_is_a_value_error():
    with pytest.raises(ValueError, match="valid mixers:.*attention"):
        build_mixer("transformerxl", D, H)


@pytest.mark.parametrize("name", NAMES)
def test_bad_sizes_and_input_rank_are_value_errors(name):
    with pytest.raises(ValueError, match="num_heads=3 must divide hidden_size=32"):
        build_mixer(name, D, 3)
    m = build_mixer(name, D, H)
    with pytest.raises(ValueError, match=r"expected hidden states \[B, T, 32\]"):
        m(torch.randn(7, D))
    with pytest.raises(ValueError, match=r"expected hidden states \[B, T, 32\]"):
        m(torch.randn(1, 7, D + 1))


# ---------------------------------------------------------------- hand checks, one per mixer


def heads(t: torch.Tensor, d: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], -1, d)


def rope_by_pairs(x_BTHD: torch.Tensor, pos_T: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """RoPE written per channel pair (i, i + D/2), rotation by pos * base^(-2i/D)."""
    out = x_BTHD.clone()
    half = x_BTHD.shape[-1] // 2
    for i in range(half):
        ang = pos_T.double() * base ** (-2 * i / x_BTHD.shape[-1])
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        a, b = x_BTHD[..., i], x_BTHD[..., i + half]
        out[..., i], out[..., i + half] = a * c - b * s, a * s + b * c
    return out


def test_attention_equals_explicit_softmax_with_causal_mask_and_rope():
    m = build("attention", num_kv_heads=1)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    hd = D // H
    pos = torch.arange(10)
    q = rope_by_pairs(heads(m.q_proj(x), hd), pos).transpose(1, 2)  # [B, H, T, hd]
    k = rope_by_pairs(heads(m.k_proj(x), hd), pos).transpose(1, 2).expand(-1, H, -1, -1)
    v = heads(m.v_proj(x), hd).transpose(1, 2).expand(-1, H, -1, -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    o = (scores.softmax(-1) @ v).transpose(1, 2).flatten(-2)
    close(m(x)[0], m.o_proj(o))
