"""Delta-rule family ops (delta_rule, gated_delta_rule, rwkv7) against token-by-token recurrences written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import _wy
from linear_moe.ops import delta_rule as dr
from linear_moe.ops import gated_delta_rule as gdr
from linear_moe.ops import rwkv7 as rk

FAMILIES = ["delta_rule", "gated_delta_rule", "rwkv7"]
SHAPES = [(2, 37, 3, 8, 5), (1, 64, 2, 4, 6), (2, 5, 1, 3, 3)]  # T=64 is an exact number of chunks


def shape_id(s: tuple[int, ...]) -> str:
    return "B{}-T{}-H{}-K{}-V{}".format(*s)


def make_inputs(
    family: str, B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype = torch.float64, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Keyword inputs of `chunk_<family>` (q/k/v or r/w/k/v/a/b), strong gates, l2-normalised keys."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def uni(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=dtype)

    k = F.normalize(rnd(B, T, H, K), dim=-1)
    if family == "rwkv7":
        kk = F.normalize(rnd(B, T, H, K), dim=-1)
        return dict(
            r=rnd(B, T, H, K),
            w=-0.6 * uni(B, T, H, K),
            k=rnd(B, T, H, K) * 0.5,
            v=rnd(B, T, H, V),
            a=-kk,
            b=kk * uni(B, T, H, K),
        )
    x = dict(q=rnd(B, T, H, K), k=k, v=rnd(B, T, H, V))
    if family == "gated_delta_rule":
        x["g"] = -5.0 * uni(B, T, H)
    x["beta"] = uni(B, T, H)
    return x


def reference(
    family: str, x: dict[str, torch.Tensor], scale: float, h0: torch.Tensor | None, l2norm: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token recurrence in float64, state [B, H, K, V]."""
    x = {n: t.double() for n, t in x.items()}
    if family == "rwkv7":
        q, k, v = x["r"], x["k"], x["v"]
    else:
        q, k, v = x["q"], x["k"], x["v"]
        if l2norm:
            q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double().clone()
    outs = []
    for t in range(T):
        if family == "rwkv7":
            sa = torch.einsum("bhk,bhkv->bhv", x["a"][:, t], S)
            S = (
                x["w"][:, t].exp()[..., None] * S
                + x["b"][:, t, :, :, None] * sa[:, :, None, :]
                + k[:, t, :, :, None] * v[:, t, :, None, :]
            )
        else:
            if family == "gated_delta_rule":
                S = S * x["g"][:, t].exp()[..., None, None]
            pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
            delta = x["beta"][:, t, :, None] * (v[:, t] - pred)
            S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


def ops(family: str) -> tuple:
    mod = {"delta_rule": dr, "gated_delta_rule": gdr, "rwkv7": rk}[family]
    return getattr(mod, f"chunk_{family}_torch"), getattr(mod, f"fused_recurrent_{family}_torch")


def call(fn, family: str, x: dict, **kw):
    """Positional call in fla's argument order (fused_recurrent_gated_delta_rule takes beta after gk, gv)."""
    if family == "rwkv7":
        return fn(x["r"], x["w"], x["k"], x["v"], x["a"], x["b"], **kw)
    if family == "gated_delta_rule":
        return fn(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], **kw)
    return fn(x["q"], x["k"], x["v"], x["beta"], **kw)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_float64(family: str, kind: str, shape: tuple[int, ...]) -> None:
    B, T, H, K, V = shape
    x = make_inputs(family, *shape)
    h0 = torch.randn(B, H, K, V, dtype=torch.float64)
    fn = ops(family)[kind == "fused_recurrent"]
    extra = {"chunk_size": 8} if kind == "chunk" else {}  # several chunks, and a partial last one for T=37
    o, s = call(fn, family, x, scale=0.7, initial_state=h0, output_final_state=True, **extra)
    o_ref, s_ref = reference(family, x, 0.7, h0)
    assert o.dtype == torch.float64 and o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_float32_default_chunk_size(family: str) -> None:
    shape = (2, 150, 2, 16, 8)
    x64 = make_inputs(family, *shape)
    x32 = {n: t.float() for n, t in x64.items()}
    o, s = call(ops(family)[0], family, x32, scale=0.5, output_final_state=True)
    o_ref, s_ref = reference(family, x64, 0.5, None)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o, o_ref, 1e-5)
    assert_close(s, s_ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("decay", [0.6065, 5.0, 40.0], ids=["rwkv7-bound", "strong", "extreme"])
def test_rwkv7_factorised_decays_stay_exact(decay: float, dtype: torch.dtype) -> None:
    """Per-channel decays factorised relative to the chunk start: at RWKV-7's own bound a 64-token chunk spans
    e^38.8 of decay; stronger decays shorten the chunk. Exact against the recurrence, finite, in both dtypes."""
    x64 = make_inputs("rwkv7", 2, 150, 2, 16, 8, seed=4)
    x64["w"] = -decay * torch.rand(x64["w"].shape, dtype=torch.float64).clamp_min(0.5)
    h0 = torch.randn(2, 2, 16, 8, dtype=torch.float64)
    x = {n: t.to(dtype) for n, t in x64.items()}
    o, s = rk.chunk_rwkv7_torch(**x, scale=1.0, initial_state=h0.to(dtype), output_final_state=True, chunk_size=64)
    o_ref, s_ref = reference("rwkv7", x64, 1.0, h0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert_close(o, o_ref, tol)
    assert_close(s, s_ref, tol)


def test_factorised_chunk_size_bounds_the_decay_a_chunk_spans() -> None:
    w = torch.full((1, 5, 1, 2), -0.6065)
    assert _wy.factorised_chunk_size(w, 64) == 64  # 64 * 0.6065 = 38.8 <= 40
    assert _wy.factorised_chunk_size(w * 2, 64) == 32
    assert _wy.factorised_chunk_size(w.new_full(w.shape, -5.0), 64) == 8
    assert _wy.factorised_chunk_size(w.new_full(w.shape, -100.0), 64) == 1  # one token per chunk: nothing to factor
    assert _wy.factorised_chunk_size(w.new_zeros(w.shape), 48) == 48


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", ["delta_rule", "gated_delta_rule"])
def test_qk_l2norm_in_kernel(family: str, kind: str) -> None:
    x = make_inputs(family, 2, 23, 2, 6, 4)
    x["k"] = x["k"] * 3.0  # not normalised
    fn = ops(family)[kind == "fused_recurrent"]
    o, s = call(fn, family, x, use_qk_l2norm_in_kernel=True, output_final_state=True)
    o_ref, s_ref = reference(family, x, 6**-0.5, None, l2norm=True)
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)
    o_plain, _ = call(fn, family, x)
    assert not torch.allclose(o, o_plain)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
def test_gated_in_kernel_activations_and_v_first(kind: str) -> None:
    x = make_inputs("gated_delta_rule", 1, 19, 2, 4, 3)
    g_raw, beta_raw = torch.randn(1, 19, 2, dtype=torch.float64), torch.randn(1, 19, 2, dtype=torch.float64)
    A_log, dt_bias = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    fn = ops("gated_delta_rule")[kind == "fused_recurrent"]
    o, s = fn(
        x["q"],
        x["k"],
        x["v"],
        g=g_raw,
        beta=beta_raw,
        initial_state=h0.transpose(-1, -2),
        output_final_state=True,
        use_gate_in_kernel=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=True,
        allow_neg_eigval=True,
        state_v_first=True,
    )
    x_ref = dict(x, g=-A_log.exp() * F.softplus(g_raw + dt_bias), beta=2 * beta_raw.sigmoid())
    o_ref, s_ref = reference("gated_delta_rule", x_ref, 4**-0.5, h0)
    assert_close(o, o_ref, 1e-10)
    assert_close(s.transpose(-1, -2), s_ref, 1e-10)


def test_fused_recurrent_gated_per_channel_gk() -> None:
    x = make_inputs("gated_delta_rule", 1, 11, 2, 4, 3)
    gk = -torch.rand(1, 11, 2, 4, dtype=torch.float64)
    o, s = gdr.fused_recurrent_gated_delta_rule_torch(
        x["q"], x["k"], x["v"], gk=gk, beta=x["beta"], output_final_state=True
    )
    # with a per-channel decay the delta rule is the DPLR recurrence with a = diag(exp(gk)) k read after decay
    S = torch.zeros(1, 2, 4, 3, dtype=torch.float64)
    outs = []
    for t in range(11):
        S = gk[:, t].exp()[..., None] * S
        delta = x["beta"][:, t, :, None] * (x["v"][:, t] - torch.einsum("bhk,bhkv->bhv", x["k"][:, t], S))
        S = S + x["k"][:, t, :, :, None] * delta[:, :, None, :]
        outs.append(0.5 * torch.einsum("bhk,bhkv->bhv", x["q"][:, t], S))
    assert_close(o, torch.stack(outs, 1), 1e-10)
    assert_close(s, S, 1e-10)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_with_carried_state_equals_whole(family: str, kind: str) -> None:
    x = make_inputs(family, 2, 30, 2, 4, 3)
    fn = ops(family)[kind == "fused_recurrent"]
    o, s = call(fn, family, x, scale=1.0, output_final_state=True)
    first = {n: t[:, :13] for n, t in x.items()}
    second = {n: t[:, 13:] for n, t in x.items()}
    o1, s1 = call(fn, family, first, scale=1.0, output_final_state=True)
    o2, s2 = call(fn, family, second, scale=1.0, initial_state=s1, output_final_state=True)
    assert_close(torch.cat([o1, o2], 1), o, 1e-10)
    assert_close(s2, s, 1e-10)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cu_seqlens_equals_separate_documents(family: str, kind: str) -> None:
    lens = [7, 20, 1, 12]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = make_inputs(family, 1, sum(lens), 2, 4, 3)
    h0 = torch.randn(len(lens), 2, 4, 3, dtype=torch.float64)
    fn = ops(family)[kind == "fused_recurrent"]
    o, s = call(fn, family, x, scale=0.8, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, sum(lens), 2, 3) and s.shape == (len(lens), 2, 4, 3)
    for n in range(len(lens)):
        doc = {name: t[:, cu[n] : cu[n + 1]] for name, t in x.items()}
        o_ref, s_ref = reference(family, doc, 0.8, h0[n : n + 1])
        assert_close(o[:, cu[n] : cu[n + 1]], o_ref, 1e-10)
        assert_close(s[n : n + 1], s_ref, 1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck_chunk(family: str) -> None:
    x = make_inputs(family, 1, 6, 1, 3, 2, seed=1)
    h0 = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    names = list(x)
    leaves = [t.clone().requires_grad_() for t in x.values()] + [h0.requires_grad_()]
    fn = ops(family)[0]

    def f(*ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kw = dict(zip(names, ts[:-1], strict=True))
        return call(fn, family, kw, scale=0.9, initial_state=ts[-1], output_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_dispatch_on_cpu_matches_torch(family: str) -> None:
    mod = {"delta_rule": dr, "gated_delta_rule": gdr, "rwkv7": rk}[family]
    x = make_inputs(family, 1, 9, 2, 4, 3)
    for kind in ("chunk", "fused_recurrent"):
        o, s = call(getattr(mod, f"{kind}_{family}"), family, x, scale=1.0, output_final_state=True)
        o_t, s_t = call(getattr(mod, f"{kind}_{family}_torch"), family, x, scale=1.0, output_final_state=True)
        assert torch.equal(o, o_t) and torch.equal(s, s_t)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_raises(family: str) -> None:
    x = make_inputs(family, 2, 8, 2, 4, 3)
    chunk = ops(family)[0]
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        call(chunk, family, {n: t[0] if n == "v" else t for n, t in x.items()})
    with pytest.raises(ValueError, match="initial_state"):
        call(chunk, family, x, initial_state=torch.zeros(2, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch size must be 1"):
        call(chunk, family, x, cu_seqlens=torch.tensor([0, 4, 8]))
    if family != "rwkv7":
        with pytest.raises(ValueError, match="beta"):
            call(chunk, family, dict(x, beta=x["beta"][..., None]))


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
def test_gated_grouped_value_heads(kind: str) -> None:
    x = make_inputs("gated_delta_rule", 1, 21, 4, 4, 3)  # 4 value heads
    q2, k2 = x["q"][:, :, :2], x["k"][:, :, :2]  # 2 query/key heads, each shared by 2 value heads
    fn = ops("gated_delta_rule")[kind == "fused_recurrent"]
    o, s = fn(q2, k2, x["v"], g=x["g"], beta=x["beta"], output_final_state=True)
    x_ref = dict(x, q=q2.repeat_interleave(2, dim=2), k=k2.repeat_interleave(2, dim=2))
    o_ref, s_ref = reference("gated_delta_rule", x_ref, 0.5, None)
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)
    with pytest.raises(ValueError, match="multiple"):
        fn(x["q"][:, :, :3], x["k"][:, :, :3], x["v"], g=x["g"], beta=x["beta"])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_float32_gradients_strong_gates(family: str) -> None:
    """Default chunk size, strong decays: float32 gradients equal autograd through the float64 recurrence."""
    x64 = make_inputs(family, 1, 70, 2, 4, 3, seed=2)
    x32 = {n: t.float().requires_grad_() for n, t in x64.items()}
    x64 = {n: t.clone().requires_grad_() for n, t in x64.items()}
    o, s = call(ops(family)[0], family, x32, scale=1.0, output_final_state=True)
    o_ref, s_ref = reference(family, x64, 1.0, None)
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.double() * do).sum() + (s.double() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    for n in x32:
        assert torch.isfinite(x32[n].grad).all()
        assert_close(x32[n].grad, x64[n].grad, 1e-4)
