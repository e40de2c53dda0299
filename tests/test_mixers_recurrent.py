"""Mixer-specific checks for deltanet, gated_deltanet, mamba2, rwkv6, rwkv7, hgrn, hgrn2: each layer's output
equals a token-by-token recurrence written here from the paper on the layer's own projections; token shift
never leaks across documents; HGRN's forget-gate lower bound holds. (The generic contract is tests/test_mixers.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.mixers import build_mixer
from linear_moe.mixers.hgrn import bounded_log_forget
from linear_moe.mixers.mamba2 import fused_state_dict, split_state_dict
from linear_moe.ops.token_shift import token_shift

D, H, T = 16, 2, 70  # T > 64: the chunked ops cross chunk boundaries


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(name: str, **opts):
    """A layer with every parameter perturbed, so zero-initialised mixing weights (mu, bonus, o_proj) matter."""
    m = build_mixer(name, D, H, layer_idx=opts.pop("layer_idx", 1), **opts)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def heads(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], -1, d)


def delta_loop(q, k, v, beta, alpha=None):
    """(Gated) delta rule with S [V, K]: S_t = alpha_t S (I - beta k k^T) + beta v k^T, o_t = S_t q_t / sqrt(K)."""
    B, L, nh, K = q.shape
    S = torch.zeros(B, nh, v.shape[-1], K)
    out = []
    for t in range(L):
        if alpha is not None:
            S = alpha[:, t, :, None, None] * S
        kt, bt = k[:, t], beta[:, t, :, None]
        S = (
            S
            - bt[..., None] * (S @ kt[..., None]) @ kt[:, :, None, :]
            + bt[..., None] * v[:, t, ..., None] * kt[:, :, None]
        )
        out.append((S @ q[:, t, ..., None])[..., 0] * K**-0.5)
    return torch.stack(out, 1)


def qkv_convs(m, x):
    return m.q_conv1d(m.q_proj(x))[0], m.k_conv1d(m.k_proj(x))[0], m.v_conv1d(m.v_proj(x))[0]


def test_deltanet_equals_delta_rule_recurrence():
    m = build("deltanet", use_gate=True)
    x = torch.randn(2, T, D)
    q, k, v = qkv_convs(m, x)
    q, k = (F.normalize(heads(t, m.head_k_dim), dim=-1) for t in (q, k))
    o = delta_loop(q, k, heads(v, m.head_v_dim), m.b_proj(x).sigmoid())
    g = heads(m.g_proj(x), m.head_v_dim)
    ref = m.o_proj((rms(o, m.o_norm.weight, 1e-5) * F.silu(g)).flatten(-2))
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-4)


def test_gated_deltanet_equals_gated_delta_rule_recurrence():
    m = build("gated_deltanet", expand_v=1.5)
    x = torch.randn(2, T, D)
    q, k, v = qkv_convs(m, x)
    q, k = (F.normalize(heads(t, m.head_k_dim), dim=-1) for t in (q, k))
    alpha = torch.exp(-m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias))
    o = delta_loop(q, k, heads(v, m.head_v_dim), m.b_proj(x).sigmoid(), alpha)
    g = heads(m.g_proj(x), m.head_v_dim)
    ref = m.o_proj((rms(o, m.o_norm.weight, 1e-5) * F.silu(g)).flatten(-2))
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-4)


def test_gated_deltanet_gva_equals_recurrence_with_shared_qk_heads():
    """num_v_heads = 2 * num_heads: value head j reads q/k head j // 2; gates are per value head."""
    m = build("gated_deltanet", num_v_heads=2 * H, expand_v=1.0)
    x = torch.randn(2, T, D)
    q, k, v = qkv_convs(m, x)
    q, k = (F.normalize(heads(t, m.head_k_dim), dim=-1).repeat_interleave(2, dim=2) for t in (q, k))
    alpha = torch.exp(-m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias))
    o = delta_loop(q, k, heads(v, m.head_v_dim), m.b_proj(x).sigmoid(), alpha)
    assert o.shape[2] == 2 * H
    g = heads(m.g_proj(x), m.head_v_dim)
    ref = m.o_proj((rms(o, m.o_norm.weight, 1e-5) * F.silu(g)).flatten(-2))
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_mamba2_equals_ssd_recurrence(norm_before_gate):
    N, G = 4, 2
    m = build("mamba2", state_size=N, n_groups=G, expand=2, norm_before_gate=norm_before_gate, D_has_hdim=True)
    x = torch.randn(2, T, D)
    I, nh, P = m.intermediate_size, m.num_heads, m.head_dim
    fused = fused_state_dict(m.state_dict())  # fla's / mamba-ssm's layout: one in_proj, one conv1d [C, 1, W]
    z, xbc, dt = F.linear(x, fused["in_proj.weight"]).split([I, I + 2 * G * N, nh], -1)
    w = fused["conv1d.weight"]
    xbc = F.conv1d(F.pad(xbc.mT, (w.shape[-1] - 1, 0)), w, fused["conv1d.bias"], groups=w.shape[0])
    xs, b, c = F.silu(xbc).mT.split([I, G * N, G * N], -1)
    xs, b, c = heads(xs, P), heads(b, N), heads(c, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -m.A_log.exp()
    h = torch.zeros(2, nh, P, N)
    ys = []
    for t in range(T):
        for j in range(nh):
            grp = j // (nh // G)
            h[:, j] = (
                torch.exp(dt[:, t, j, None, None] * A[j]) * h[:, j]
                + dt[:, t, j, None, None] * xs[:, t, j, :, None] * b[:, t, grp, None, :]
            )
        y_t = torch.stack([(h[:, j] @ c[:, t, j // (nh // G), :, None])[..., 0] for j in range(nh)], 1)
        ys.append(y_t + m.D.view(nh, P) * xs[:, t])
    y = torch.stack(ys, 1).flatten(-2)
    w, gs = m.norm.weight, I // G
    if norm_before_gate:
        y = rms(heads(y, gs), None, 1e-5).flatten(-2) * w * F.silu(z)
    else:
        y = rms(heads(y * F.silu(z), gs), None, 1e-5).flatten(-2) * w
    torch.testing.assert_close(m(x)[0], m.out_proj(y), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_mamba2_fused_layout_round_trips(use_bias):
    """fla's / mamba-ssm's fused Mamba2 weights load into our separate projections and convolutions (a model's
    state dict, under its prefix) and convert back exactly; a fused conv weight may also come as [C, W]."""
    N, G = 4, 2
    m = build("mamba2", state_size=N, n_groups=G, use_bias=use_bias)
    ours = {f"layers.3.mixer.{k}": v for k, v in m.state_dict().items()}
    fused = fused_state_dict(ours, "layers.3.mixer.")
    I, C = m.intermediate_size, m.intermediate_size + 2 * G * N
    assert fused["layers.3.mixer.in_proj.weight"].shape == (I + C + H, D)
    assert fused["layers.3.mixer.conv1d.weight"].shape == (C, 1, 4)
    assert ("layers.3.mixer.in_proj.bias" in fused) == use_bias
    assert not any("z_proj" in k or "x_conv1d" in k for k in fused)
    for conv in (fused["layers.3.mixer.conv1d.weight"], fused["layers.3.mixer.conv1d.weight"][:, 0]):
        back = split_state_dict({**fused, "layers.3.mixer.conv1d.weight": conv}, "layers.3.mixer.")
        assert back.keys() == ours.keys()
        for k, v in ours.items():
            assert torch.equal(back[k], v), k


def test_mamba2_loads_a_fused_state_dict():
    """A model state dict in the fused layout (an older checkpoint or export, fla's weights) loads directly into
    a model with Mamba2 layers: the same outputs as the model it came from."""
    from linear_moe.model.lm import LinearMoEForCausalLM
    from linear_moe.model.presets import get_preset

    torch.manual_seed(0)
    cfg = get_preset("debug-dense").replace(mixer="mamba2", mixer_kwargs={"state_size": 4, "n_groups": 2})
    src, dst = LinearMoEForCausalLM(cfg), LinearMoEForCausalLM(cfg)
    fused = src.state_dict()
    for i in range(cfg.num_layers):
        fused = fused_state_dict(fused, f"layers.{i}.mixer.")
    assert any(k.endswith("in_proj.weight") for k in fused)
    dst.load_state_dict(fused, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    torch.testing.assert_close(dst(ids).logits, src(ids).logits, atol=0, rtol=0)


def test_rwkv6_equals_finch_recurrence():
    m = build("rwkv6", proj_low_rank_dim=3, gate_low_rank_dim=5)
    x = torch.randn(2, T, D)
    prev = torch.cat([torch.zeros(2, 1, D), x[:, :-1]], 1)
    dx = prev - x
    lora = torch.tanh(m.x_proj[0].linear(x + dx * m.x_proj[0].mu))
    W2 = m.x_proj[2].weight
    R = m.proj_low_rank_dim
    mus = [lora[..., i * R : (i + 1) * R] @ W2[:, i * R : (i + 1) * R].T + m.x_bias[i] for i in range(5)]
    r, w, k, v, g = (
        proj.linear(x + dx * mu)
        for proj, mu in zip((m.r_proj, m.w_proj, m.k_proj, m.v_proj, m.g_proj), mus, strict=True)
    )
    K, V = m.head_k_dim, m.head_v_dim
    r, k, decay, v = heads(r, K), heads(k, K), torch.exp(-torch.exp(heads(w, K))), heads(v, V)
    S = torch.zeros(2, H, K, V)
    out = []
    for t in range(T):
        kv = k[:, t, ..., None] * v[:, t, :, None]
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + m.bonus[..., None] * kv))
        S = decay[:, t, ..., None] * S + kv
    o = torch.stack(out, 1)
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + 1e-5)).flatten(-2) * m.g_norm.weight + m.g_norm.bias
    torch.testing.assert_close(m(x)[0], m.o_proj(o * F.silu(g)), atol=2e-5, rtol=1e-4)


def test_rwkv7_equals_goose_recurrence():
    m = build("rwkv7", decay_low_rank_dim=4, a_low_rank_dim=4, gate_low_rank_dim=6)
    x = torch.randn(2, T, D)
    prev = torch.cat([torch.zeros(2, 1, D), x[:, :-1]], 1)
    xr, xw, xk, xv, xa, xg = (x + (prev - x) * mu for mu in (m.x_r, m.x_w, m.x_k, m.x_v, m.x_a, m.x_g))
    K = m.head_dim
    # official RWKV-7 form: w = exp(-exp(-softplus(-(w0 + lora)) - 0.5))
    decay = torch.exp(-torch.exp(-F.softplus(-m.w_lora(xw)) - 0.5))
    k, a = m.k_proj(xk), torch.sigmoid(m.a_lora(xa))
    kk = F.normalize(heads(k * m.k_k, K), dim=-1)
    k = k * (1 + (a - 1) * m.k_a)
    r, k, a, decay, v = heads(m.r_proj(xr), K), heads(k, K), heads(a, K), heads(decay, K), heads(m.v_proj(xv), K)
    S = torch.zeros(2, H, K, K)  # [V, K] as in the paper
    out = []
    for t in range(T):
        sa = S @ (-kk[:, t, ..., None])  # [B, H, V, 1]
        S = (
            S * decay[:, t, :, None, :]
            + sa @ (kk[:, t] * a[:, t])[:, :, None, :]
            + v[:, t, ..., None] * k[:, t, :, None, :]
        )
        out.append((S @ r[:, t, ..., None])[..., 0])
    o = torch.stack(out, 1)
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    o = ((o - mean) / torch.sqrt(var + K * 1e-5)).flatten(-2) * m.g_norm.weight + m.g_norm.bias
    o = o + ((r * k * m.r_k).sum(-1, keepdim=True) * v).flatten(-2)
    torch.testing.assert_close(m(x)[0], m.o_proj(o * m.g_lora(xg)), atol=2e-5, rtol=1e-4)


def hgrn_loop(i, lam):
    h, out = torch.zeros_like(i[:, 0]), []
    for t in range(i.shape[1]):
        h = lam[:, t] * h + (1 - lam[:, t]) * i[:, t]
        out.append(h)
    return torch.stack(out, 1)


def set_lower_bound(m, gamma):
    """Set the layer's own forget-gate floor to gamma (it stores sigmoid^-1 of it)."""
    with torch.no_grad():
        m.lower_bound_logit.copy_(torch.logit(gamma.double()).to(m.lower_bound_logit.dtype))


def test_hgrn_recurrence_and_lower_bound():
    m = build("hgrn", layer_idx=2, use_short_conv=True)
    x = torch.randn(2, T, D)
    gamma = torch.rand(D) * 0.9 + 1e-3
    set_lower_bound(m, gamma)
    lam = gamma + (1 - gamma) * torch.sigmoid(m.f_conv1d(m.f_proj(x))[0])
    assert (lam >= gamma).all()
    h = hgrn_loop(F.silu(m.i_conv1d(m.i_proj(x))[0]), lam)
    ref = m.o_proj(rms(h, m.g_norm.weight, 1e-5) * F.silu(m.g_proj(x)))
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-4)
    # a bound near 1 freezes the state: the recurrent state stays at its initial value
    s0 = {"recurrent": torch.randn(2, D), **{k: torch.zeros(2, D, 3) for k in ("conv_i", "conv_f")}}
    set_lower_bound(m, torch.full((D,), 1 - 1e-7))
    _, s1 = m(x, state=s0)
    torch.testing.assert_close(s1["recurrent"], s0["recurrent"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["hgrn", "hgrn2"])
def test_hgrn_first_layer_has_no_bound_and_initial_bounds_rise_with_depth(name):
    """fla's cumulative softmax over zero logits gives layer i the floor i / L at init; each layer owns its own."""
    L = 5
    layers = [build_mixer(name, D, H, layer_idx=i, num_layers=L) for i in range(L)]
    assert layers[0].lower_bound_logit is None
    for i, m in enumerate(layers[1:], start=1):
        gamma = torch.sigmoid(m.lower_bound_logit.double())
        torch.testing.assert_close(gamma, torch.full_like(gamma, i / L))
    # and the bound takes effect: the gate equals gamma + (1 - gamma) sigmoid(f)
    f = torch.randn(3, layers[2].lower_bound_logit.shape[0])
    lam = bounded_log_forget(f, layers[2].lower_bound_logit).exp()
    torch.testing.assert_close(lam, 0.4 + 0.6 * torch.sigmoid(f), atol=1e-6, rtol=1e-6)


def test_hgrn2_equals_state_expanded_recurrence():
    m = build("hgrn2", expand_ratio=4, layer_idx=3)
    x = torch.randn(2, T, D)
    gamma = torch.rand(m.forget_dim) * 0.5 + 1e-3
    set_lower_bound(m, gamma)
    lam = heads(gamma + (1 - gamma) * torch.sigmoid(m.f_proj(x)), 4)
    q, i = heads(F.silu(m.q_proj(x)), 4), heads(m.i_proj(x), D // H)
    S, out = torch.zeros(2, H, 4, D // H), []
    for t in range(T):
        S = lam[:, t, ..., None] * S + (1 - lam[:, t, ..., None]) * i[:, t, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * 4**-0.5, S))
    ref = m.o_proj(rms(torch.stack(out, 1).flatten(-2), m.g_norm.weight, 1e-5))
    torch.testing.assert_close(m(x)[0], ref, atol=2e-5, rtol=1e-4)


def test_token_shift_reads_state_rows_not_previous_document():
    x = torch.randn(1, 9, 3)
    cu = torch.tensor([0, 4, 4, 9])  # the middle document is empty
    state = torch.randn(3, 3)
    delta, new = token_shift(x, state, cu)
    prev = torch.cat([state[:1], x[0, 0:3], state[2:], x[0, 4:8]])[None]
    torch.testing.assert_close(delta, prev - x)
    torch.testing.assert_close(new, torch.stack([x[0, 3], state[1], x[0, 8]]))
    delta0, _ = token_shift(x, None, cu)
    torch.testing.assert_close(delta0[0, 4], -x[0, 4])


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
def test_rwkv_packed_documents_do_not_leak(name):
    m = build(
        name,
        **(
            {"proj_low_rank_dim": 3, "gate_low_rank_dim": 5}
            if name == "rwkv6"
            else {"decay_low_rank_dim": 4, "a_low_rank_dim": 4, "gate_low_rank_dim": 6}
        ),
    )
    a, b = torch.randn(1, 5, D), torch.randn(1, 6, D)
    cu = torch.tensor([0, 5, 11])
    y = m(torch.cat([a, b], 1), cu_seqlens=cu)[0]
    y_other = m(torch.cat([torch.randn(1, 5, D), b], 1), cu_seqlens=cu)[0]
    torch.testing.assert_close(y[:, 5:], y_other[:, 5:])  # document 2 ignores document 1 entirely
    torch.testing.assert_close(y[:, 5:], m(b)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "name, opts",
    [
        ("deltanet", {"qk_activation": "tanh"}),
        ("deltanet", {"qk_norm": "l1"}),
        ("gated_deltanet", {"output_gate_activation": "gelu"}),
        ("gated_deltanet", {"num_v_heads": 3}),
        ("mamba2", {"n_groups": 3}),
        ("rwkv6", {"gate_fn": "softmax"}),
        ("rwkv6", {"expand_k": 0.3}),
        ("hgrn", {"expand_ratio": 0}),
        ("hgrn2", {"expand_ratio": 0}),
    ],
)
def test_bad_options_raise(name, opts):
    with pytest.raises(ValueError, match=next(iter(opts))):
        build_mixer(name, D, H, **opts)


def test_state_with_missing_key_raises():
    m = build_mixer("deltanet", D, H)
    _, state = m(torch.randn(1, 3, D), use_cache=True)
    del state["conv_k"]
    with pytest.raises(ValueError, match="conv_k"):
        m(torch.randn(1, 1, D), state=state)
