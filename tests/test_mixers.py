"""The mixer contract (mixers/base.py), checked for every mixer in MIXERS on CPU in float64:
split sequences with carried state, packed documents (cu_seqlens), step-by-step decoding, gradients, bad input.
Plus hand checks of retnet, gla, lightning_attn, based, rebased, linear_attn and attention against formulas
written here. (Recurrent mixers' own hand checks: tests/test_mixers_recurrent.py.)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.mixers import MIXERS, MixerContext, build_mixer
from linear_moe.mixers.feature_maps import FEATURE_MAPS, TaylorFeatureMap, build_feature_map

D, H = 32, 2
NAMES = list(MIXERS)
# Every mixer with its defaults, plus option variants that change the state or the plumbing.
VARIANTS = {
    "retnet+conv+gqa": ("retnet", dict(use_short_conv=True, num_kv_heads=1)),
    "gla+conv+gqa+relu": ("gla", dict(use_short_conv=True, num_kv_heads=1, feature_map="relu", clamp_min=-1.0)),
    "lightning_attn+conv+layers": ("lightning_attn", dict(use_short_conv=True, num_layers=4)),
    "linear_attn+norm+hedgehog+conv": (
        "linear_attn",
        dict(do_feature_map_norm=True, feature_map="hedgehog", use_short_conv=True),
    ),
    "based+conv": ("based", dict(use_short_conv=True, feature_dim=4)),
    "attention+gqa+qknorm": ("attention", dict(num_kv_heads=1, qk_norm=True, rotary_dim=8)),
    "gated_deltanet+gva": ("gated_deltanet", dict(num_v_heads=4, expand_v=1.0)),
    "mamba2+groups": ("mamba2", dict(n_groups=2, state_size=8, norm_before_gate=True, use_bias=True)),
}
CASES = [pytest.param(n, {}, id=n) for n in NAMES] + [pytest.param(n, o, id=i) for i, (n, o) in VARIANTS.items()]
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
        return {k: state[k][n : n + 1][:, :, keep] for k in ("k", "v")}
    return {k: s[n : n + 1] for k, s in state.items()}


def states_close(a: dict, b: dict) -> None:
    a, b = doc_state(a, 0) if "valid" in a else a, doc_state(b, 0) if "valid" in b else b
    assert set(a) == set(b)
    for k in a:
        close(a[k].double(), b[k].double())


def stack_states(states: list[dict]) -> dict:
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}


# ---------------------------------------------------------------- the contract, for every mixer


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize(("name", "opts"), CASES)
@torch.no_grad()
def test_two_pieces_with_state_equal_whole(name, opts, recurrent):
    m = build(name, **opts).train(not recurrent)  # eval + a state + short input -> fused_recurrent kernels
    x = torch.randn(2, 45, D, dtype=torch.float64)
    y, s = m(x, use_cache=True)
    y1, s1 = m(x[:, :19], use_cache=True)
    y2, s2 = m(x[:, 19:], state=s1)
    close(torch.cat([y1, y2], 1), y)
    states_close(s2, s)


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize(("name", "opts"), CASES)
@torch.no_grad()
def test_packed_documents_equal_separate_runs(name, opts, recurrent):
    m = build(name, **opts).train(not recurrent)  # eval: the continuation below runs the recurrent kernels
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


@pytest.mark.parametrize(("name", "opts"), CASES)
@torch.no_grad()
def test_step_by_step_decoding_equals_full_forward(name, opts):
    m = build(name, **opts).eval()
    x = torch.randn(2, 16, D, dtype=torch.float64)
    y_full, s_full = m(x, use_cache=True)
    y_pre, s = m(x[:, :9], use_cache=True)
    ys = [y_pre]
    for t in range(9, 16):
        y_t, s = m(x[:, t : t + 1], state=s)
        ys.append(y_t)
    close(torch.cat(ys, 1), y_full)
    states_close(s, s_full)


@pytest.mark.parametrize(("name", "opts"), CASES)
def test_backward_gives_finite_gradients_to_every_parameter(name, opts):
    m = build(name, **opts).train()
    x = torch.randn(2, 21, D, dtype=torch.float64, requires_grad=True)
    context = MixerContext()  # cross-layer inputs (RWKV-7's v_first) come from a layer-0 twin
    build(name, layer_idx=0, **opts)(x, context=context)
    y, _ = m(x, context=context)
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


def rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def causal_decay_attention(q, k, v, log_decay_H: torch.Tensor, scale: float) -> torch.Tensor:
    """o_t = scale * sum_{s<=t} exp((t-s) log gamma_h) (q_t . k_s) v_s, written as a masked matrix; [B, T, H, *]."""
    T = q.shape[1]
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double()  # t - s
    decay_HTT = torch.where(dist >= 0, torch.exp(dist * log_decay_H.double()[:, None, None]), 0.0)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * scale * decay_HTT
    return torch.einsum("bhts,bshv->bthv", scores, v)


def test_retnet_equals_parallel_retention_with_rope_and_gamma():
    m = build("retnet", layer_idx=0)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    pos = torch.arange(12)
    q = rope_by_pairs(heads(m.q_proj(x), m.head_k_dim), pos)
    k = rope_by_pairs(heads(m.k_proj(x), m.head_k_dim), pos)
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)], dtype=torch.float64)
    o = causal_decay_attention(q, k, heads(m.v_proj(x), m.head_v_dim), gamma.log(), m.head_k_dim**-0.5)
    g = heads(m.g_proj(x), m.head_v_dim)
    ref = m.o_proj((rms(o, m.g_norm_swish_gate.weight, 1e-5) * F.silu(g)).flatten(-2))
    close(m(x)[0], ref)


def test_gla_equals_gated_recurrence():
    m = build("gla", num_kv_heads=1)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    hk, hv = m.head_k_dim, m.head_v_dim
    q = heads(m.q_proj(x), hk)
    k = heads(m.k_proj(x), hk).expand(-1, -1, H, -1)
    v = heads(m.v_proj(x), hv).expand(-1, -1, H, -1)
    alpha = torch.sigmoid(heads(m.gk_proj[1](m.gk_proj[0](x)), hk)).pow(1 / 16).expand(-1, -1, H, -1)
    S, outs = torch.zeros(2, H, hk, hv, dtype=torch.float64), []
    for t in range(11):
        S = alpha[:, t, ..., None] * S + k[:, t, ..., None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * hk**-0.5)
    o = torch.stack(outs, 1)
    g = heads(m.g_proj(x), hv)
    ref = m.o_proj((rms(o, m.g_norm_swish_gate.weight, 1e-5) * F.silu(g)).flatten(-2))
    close(m(x)[0], ref)


@pytest.mark.parametrize("num_layers", [None, 4])
def test_lightning_attention_equals_decayed_attention_with_alibi_slopes(num_layers):
    m = build("lightning_attn", layer_idx=2, num_layers=num_layers)
    x = torch.randn(2, 13, D, dtype=torch.float64)
    hd = D // H
    q, k, v = (F.silu(heads(p(x), hd)) for p in (m.q_proj, m.k_proj, m.v_proj))
    factor = 1.0 if num_layers is None else 1 - 2 / (3 + 1e-5) + 1e-5
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) * factor for h in range(H)], dtype=torch.float64)
    o = causal_decay_attention(q, k, v, -slopes, 1.0).flatten(-2)
    ref = m.o_proj(rms(o, m.g_norm.weight, 1e-6) * torch.sigmoid(m.g_proj(x)))
    close(m(x)[0], ref)


def test_linear_attn_equals_cumulative_sum_formula():
    m = build("linear_attn", feature_map="elu_p1", do_feature_map_norm=True, num_kv_heads=1)
    x = torch.randn(2, 15, D, dtype=torch.float64)
    hd = D // H
    q = F.elu(heads(m.q_proj(x), hd)) + 1
    k = (F.elu(heads(m.k_proj(x), hd)) + 1).expand(-1, -1, H, -1)
    v = heads(m.v_proj(x), hd).expand(-1, -1, H, -1)
    kv_cum = torch.einsum("bthk,bthv->bthkv", k, v).cumsum(1)  # sum_{s<=t} k_s v_s^T
    num = torch.einsum("bthk,bthkv->bthv", q, kv_cum) * hd**-0.5
    den = (q * k.cumsum(1)).sum(-1, keepdim=True) * hd**-0.5 + 1e-10
    ref = m.o_proj(rms(num / den, m.norm.weight, 1e-5).flatten(-2))
    close(m(x)[0], ref)


def kernel_attention(q, k, v, kernel) -> torch.Tensor:
    """o_t = sum_{s<=t} K(q_t, k_s) v_s / sum_{s<=t} K(q_t, k_s) with K applied to q_t . k_s."""
    T = q.shape[1]
    w = kernel(torch.einsum("bthk,bshk->bhts", q, k)) * torch.ones(T, T, dtype=torch.bool).tril()
    return torch.einsum("bhts,bshv->bthv", w, v) / (w.sum(-1).transpose(1, 2)[..., None] + 1e-10)


def test_based_equals_taylor_softmax_approximation():
    m = build("based", feature_dim=4)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    q, k, v = heads(m.q_proj(x), 4), heads(m.k_proj(x), 4), heads(m.v_proj(x), D // H)
    o = kernel_attention(q, k, v, lambda s: 1 + s / 2 + s**2 / 8)  # 1 + s/sqrt(d) + s^2/(2d), d = 4
    close(m(x)[0], m.o_proj(o.flatten(-2)))


def test_rebased_equals_squared_kernel_of_normalised_affine_qk():
    m = build("rebased", feature_dim=4)
    x = torch.randn(2, 12, D, dtype=torch.float64)
    g, b = m.feature_map.gamma, m.feature_map.beta
    q, k = (F.layer_norm(heads(p(x), 4), (4,)) * g + b for p in (m.q_proj, m.k_proj))
    o = kernel_attention(q, k, heads(m.v_proj(x), D // H), lambda s: s**2 / 4)
    close(m(x)[0], m.o_proj(o.flatten(-2)))


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_feature_maps_have_their_declared_width(name):
    phi = build_feature_map(name, 6)
    assert phi(torch.randn(3, 5, 6)).shape == (3, 5, phi.out_dim)


def test_taylor_feature_map_dot_product_is_second_order_exp():
    q, k = torch.randn(10, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    phi = TaylorFeatureMap(8)
    s = (q * k).sum(-1)
    close((phi(q) * phi(k)).sum(-1), 1 + s / 8**0.5 + s**2 / 16)


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="unknown feature map 'cosh'; valid: .*elu_p1"):
        build_mixer("linear_attn", D, H, feature_map="cosh")
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=2"):
        build_mixer("attention", D, H, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=2"):
        build_mixer("retnet", D, H, num_kv_heads=3)
    with pytest.raises(ValueError, match="expand_k = 12.8 must be a positive integer"):
        build_mixer("gla", D, H, expand_k=0.4)
    with pytest.raises(ValueError, match="gate_fn must be 'swish' or 'sigmoid'"):
        build_mixer("gla", D, H, gate_fn="tanh")
    with pytest.raises(ValueError, match="layer_idx=5 must be in"):
        build_mixer("lightning_attn", D, H, layer_idx=5, num_layers=4)
    with pytest.raises(ValueError, match="state is missing"):
        build_mixer("retnet", D, H)(torch.randn(1, 3, D), state={"recurrent": torch.zeros(1, H, 16, 32)})
    with pytest.raises(ValueError, match=r"state\['k'\] has shape"):
        build_mixer("attention", D, H)(
            torch.randn(2, 3, D), state={"k": torch.zeros(1, H, 4, 16), "v": torch.zeros(1, H, 4, 16)}
        )


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_unknown_option_is_a_value_error_listing_valid_ones(name):
    with pytest.raises(ValueError, match=rf"mixer '{name}': unknown option\(s\) no_such_option; valid options: "):
        build_mixer(name, D, H, no_such_option=1)
