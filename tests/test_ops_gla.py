"""The gated-linear-attention ops (simple_gla, linear_attn, gla, hgrn, rwkv6) on CPU: the chunked and the
token-loop PyTorch forms against a token-by-token recurrence written here from the papers' equations, with
initial/final states, T not a multiple of the chunk size, strong decays, packed documents, state carry-over,
gradients (gradcheck) and input validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from linear_moe.ops import gla, hgrn, linear_attn, rwkv6, simple_gla

F64 = torch.float64


def ref_gated(q, k, v, gk, scale, h0, gv=None, u=None):
    """S_t = diag(e^gk_t) S_{t-1} diag(e^gv_t) + k_t v_t^T; o_t = scale q_t^T S_t (or RWKV-6's read-before-write
    o_t = scale q_t^T (S_{t-1} + diag(u) k_t v_t^T) when the bonus u is given). All `[B, T, H, *]`, float64."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=F64) if h0 is None else h0.to(F64).clone()
    outs = []
    for t in range(T):
        kv = torch.einsum("bhk,bhv->bhkv", k[:, t].to(F64), v[:, t].to(F64))
        read = (S + u.to(F64)[None, :, :, None] * kv) if u is not None else None
        S = S * gk[:, t].to(F64).exp()[..., None]
        if gv is not None:
            S = S * gv[:, t].to(F64).exp()[..., None, :]
        S = S + kv
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(F64), S if u is None else read))
    return torch.stack(outs, 1), S


def ref_hgrn(x, g, h0):
    h = torch.zeros(x.shape[0], x.shape[2], dtype=F64) if h0 is None else h0.to(F64)
    outs = []
    for t in range(x.shape[1]):
        h = g[:, t].to(F64).exp() * h + x[:, t].to(F64)
        outs.append(h)
    return torch.stack(outs, 1), h


def ref_linear_attn_normalized(q, k, v, scale, h0):
    s0, z0 = (None, None) if h0 is None else h0
    o, S = ref_gated(q, k, v, torch.zeros_like(q), scale, s0)
    z = torch.zeros_like(q[:, :1], dtype=F64) if z0 is None else z0.to(F64)
    denoms = []
    for t in range(q.shape[1]):
        z = z + k[:, t : t + 1].to(F64)
        denoms.append((scale * q[:, t : t + 1].to(F64) * z).sum(-1, keepdim=True) + 1e-10)
    return o / torch.cat(denoms, 1), (S, z)


@dataclass
class Family:
    """How to build inputs for one op family and run its ops and its reference."""

    chunk: Callable[..., Any]
    recurrent: Callable[..., Any]
    time_args: tuple[str, ...]  # [B, T, ...] arguments (sliced for packing/splitting)
    make: Callable[..., tuple[dict, dict]]  # (B, T, H, K, V, dtype, decay_min) -> (time kwargs, other kwargs)
    make_state: Callable[..., Any]  # (N, H, K, V, dtype) -> initial state
    ref: Callable[..., tuple[torch.Tensor, Any]]  # (time kwargs, other kwargs, h0) -> (o, S)
    recurrent_rename: dict[str, str] | None = None  # argument names that differ in the fused_recurrent op


def _qkv(B, T, H, K, V, dt):
    return torch.randn(B, T, H, K, dtype=dt), torch.randn(B, T, H, K, dtype=dt), torch.randn(B, T, H, V, dtype=dt)


def _kv_state(N, H, K, V, dt):
    return torch.randn(N, H, K, V, dtype=dt)


def _decay(shape, dt, lo):
    return torch.rand(*shape, dtype=dt) * lo  # log decay uniform in [lo, 0]


def make_simple_gla(B, T, H, K, V, dt, lo):
    q, k, v = _qkv(B, T, H, K, V, dt)
    return {"q": q, "k": k, "v": v, "g": _decay((B, T, H), dt, lo)}, {"g_gamma": _decay((H,), dt, 1.0), "scale": 0.7}


def ref_simple_gla(tk, ok, h0):
    gk = (tk["g"] + ok["g_gamma"])[..., None].expand_as(tk["q"])
    return ref_gated(tk["q"], tk["k"], tk["v"], gk, ok["scale"], h0)


def make_gla(B, T, H, K, V, dt, lo):
    q, k, v = _qkv(B, T, H, K, V, dt)
    return {"q": q, "k": k, "v": v, "g": _decay((B, T, H, K), dt, lo)}, {}


def ref_gla(tk, ok, h0):
    return ref_gated(tk["q"], tk["k"], tk["v"], tk["g"], tk["q"].shape[-1] ** -0.5, h0)


def make_rwkv6(B, T, H, K, V, dt, lo):
    r, k, v = _qkv(B, T, H, K, V, dt)
    return {"r": r, "k": k, "v": v, "w": _decay((B, T, H, K), dt, lo)}, {"u": torch.randn(H, K, dtype=dt), "scale": 1.0}


def ref_rwkv6(tk, ok, h0):
    return ref_gated(tk["r"], tk["k"], tk["v"], tk["w"], ok["scale"], h0, u=ok["u"])


def make_linear_attn(B, T, H, K, V, dt, lo):
    q, k, v = _qkv(B, T, H, K, V, dt)
    # positive feature maps keep the normaliser away from zero
    return {"q": q.sigmoid(), "k": k.sigmoid(), "v": v}, {"normalize": True}


def make_linear_attn_state(N, H, K, V, dt):
    return _kv_state(N, H, K, V, dt), torch.rand(N, 1, H, K, dtype=dt)


def ref_linear_attn(tk, ok, h0):
    return ref_linear_attn_normalized(tk["q"], tk["k"], tk["v"], tk["q"].shape[-1] ** -0.5, h0)


def make_hgrn(B, T, H, K, V, dt, lo):
    return {"x": torch.randn(B, T, H * K, dtype=dt), "g": _decay((B, T, H * K), dt, lo)}, {}


def ref_hgrn_case(tk, ok, h0):
    return ref_hgrn(tk["x"], tk["g"], h0)


FAMILIES = {
    "simple_gla": Family(
        simple_gla.chunk_simple_gla_torch,
        simple_gla.fused_recurrent_simple_gla_torch,
        ("q", "k", "v", "g"),
        make_simple_gla,
        _kv_state,
        ref_simple_gla,
    ),
    "gla": Family(
        gla.chunk_gla_torch,
        gla.fused_recurrent_gla_torch,
        ("q", "k", "v", "g"),
        make_gla,
        _kv_state,
        ref_gla,
        recurrent_rename={"g": "gk"},
    ),
    "rwkv6": Family(
        rwkv6.chunk_rwkv6_torch,
        rwkv6.fused_recurrent_rwkv6_torch,
        ("r", "k", "v", "w"),
        make_rwkv6,
        _kv_state,
        ref_rwkv6,
    ),
    "linear_attn": Family(
        linear_attn.chunk_linear_attn_torch,
        linear_attn.fused_recurrent_linear_attn_torch,
        ("q", "k", "v"),
        make_linear_attn,
        make_linear_attn_state,
        ref_linear_attn,
    ),
    "hgrn": Family(
        hgrn.chunk_hgrn_torch,
        hgrn.fused_recurrent_hgrn_torch,
        ("x", "g"),
        make_hgrn,
        lambda N, H, K, V, dt: torch.randn(N, H * K, dtype=dt),
        ref_hgrn_case,
    ),
}


def call(fam: Family, recurrent: bool, tk: dict, ok: dict, h0: Any, **extra: Any):
    if recurrent:
        tk = {(fam.recurrent_rename or {}).get(n, n): t for n, t in tk.items()}
    fn = fam.recurrent if recurrent else fam.chunk
    return fn(**tk, **ok, initial_state=h0, output_final_state=True, **extra)


def flat(state: Any) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def assert_close(got, want, tol):
    for g, w in zip(flat(got), flat(want), strict=True):
        err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)).item()
        assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


SHAPES = [(2, 37, 3, 8, 5), (1, 32, 2, 4, 4), (1, 1, 1, 3, 2), (2, 70, 2, 6, 3)]
SHAPE_IDS = [f"B{b}-T{t}-H{h}-K{k}-V{v}" for b, t, h, k, v in SHAPES]


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_reference_float64(family, shape, recurrent):
    seeded()
    fam = FAMILIES[family]
    B, T, H, K, V = shape
    tk, ok = fam.make(B, T, H, K, V, F64, -5.0)
    h0 = fam.make_state(B, H, K, V, F64)
    o, s = call(fam, recurrent, tk, ok, h0)
    o_ref, s_ref = fam.ref(tk, ok, h0)
    assert o.dtype == F64 and o.shape == o_ref.shape
    assert_close(o, o_ref, 1e-10)
    assert_close(s, s_ref, 1e-10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_strong_decay_stays_finite_and_accurate(family):
    """Log decays down to -30 per token (far below fla's usual range) in float32: no overflow, no NaN."""
    seeded(1)
    fam = FAMILIES[family]
    tk, ok = fam.make(2, 45, 2, 8, 4, torch.float32, -30.0)
    h0 = fam.make_state(2, 2, 8, 4, torch.float32)
    o, s = call(fam, False, tk, ok, h0)
    assert o.dtype == torch.float32 and torch.isfinite(o).all()
    o_ref, s_ref = fam.ref(tk, ok, h0)
    assert_close(o, o_ref, 1e-5)
    assert_close(s, s_ref, 1e-5)


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_documents_equal_separate_runs(family, recurrent):
    seeded(2)
    fam = FAMILIES[family]
    lens = [5, 21, 1, 19]
    H, K, V = 2, 4, 3
    tk, ok = fam.make(1, sum(lens), H, K, V, F64, -3.0)
    h0 = fam.make_state(len(lens), H, K, V, F64)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    o, s = call(fam, recurrent, tk, ok, h0, cu_seqlens=cu)
    for n in range(len(lens)):
        doc = {name: t[:, cu[n] : cu[n + 1]] for name, t in tk.items()}
        h0_n = tuple(x[n : n + 1] for x in h0) if isinstance(h0, tuple) else h0[n : n + 1]
        o_n, s_n = fam.ref(doc, ok, h0_n)
        assert_close(o[:, cu[n] : cu[n + 1]], o_n, 1e-10)
        assert_close(tuple(x[n : n + 1] for x in flat(s)), s_n, 1e-10)


@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_split_with_carried_state_equals_whole(family, recurrent):
    seeded(3)
    fam = FAMILIES[family]
    tk, ok = fam.make(2, 41, 2, 4, 3, F64, -2.0)
    h0 = fam.make_state(2, 2, 4, 3, F64)
    o, s = call(fam, recurrent, tk, ok, h0)
    cut = 23
    o1, s1 = call(fam, recurrent, {n: t[:, :cut] for n, t in tk.items()}, ok, h0)
    o2, s2 = call(fam, recurrent, {n: t[:, cut:] for n, t in tk.items()}, ok, s1)
    assert_close(torch.cat([o1, o2], 1), o, 1e-10)
    assert_close(s2, s, 1e-10)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradcheck_chunk(family):
    seeded(4)
    fam = FAMILIES[family]
    tk, ok = fam.make(1, 7, 1, 2, 2, F64, -2.0)
    h0 = fam.make_state(1, 1, 2, 2, F64)
    states = flat(h0)
    consts = {n: t for n, t in ok.items() if isinstance(t, torch.Tensor)}  # g_gamma, u
    leaves = [*tk.values(), *states, *consts.values()]

    def fn(*xs):
        t, st, c = xs[: len(tk)], xs[len(tk) : len(tk) + len(states)], xs[len(tk) + len(states) :]
        o, s = fam.chunk(
            **dict(zip(tk, t, strict=True)),
            **{**ok, **dict(zip(consts, c, strict=True))},
            initial_state=tuple(st) if len(st) > 1 else st[0],
            output_final_state=True,
            chunk_size=4,
        )
        return (o, *flat(s))

    assert torch.autograd.gradcheck(fn, [x.clone().requires_grad_() for x in leaves])


def test_simple_gla_g_gamma_alone_is_a_fixed_decay():
    seeded(5)
    q, k, v = _qkv(1, 19, 2, 4, 3, F64)
    gamma = torch.tensor([-0.1, -2.0], dtype=F64)
    o, s = simple_gla.chunk_simple_gla_torch(q, k, v, g_gamma=gamma, output_final_state=True)
    o_ref, s_ref = ref_gated(q, k, v, gamma[:, None].expand_as(q), 4**-0.5, None)
    assert_close((o, s), (o_ref, s_ref), 1e-10)


def test_state_v_first_transposes_the_state():
    seeded(6)
    tk, ok = make_gla(1, 9, 2, 4, 3, F64, -1.0)
    h0 = _kv_state(1, 2, 4, 3, F64)
    o, s = gla.chunk_gla_torch(**tk, initial_state=h0, output_final_state=True)
    o_t, s_t = gla.chunk_gla_torch(
        **tk, initial_state=h0.transpose(-1, -2).contiguous(), output_final_state=True, state_v_first=True
    )
    assert_close(o_t, o, 1e-12)
    assert_close(s_t.transpose(-1, -2), s, 1e-12)


def test_gla_value_gate_and_reverse_in_the_token_loop():
    seeded(7)
    tk, _ = make_gla(2, 13, 2, 4, 3, F64, -1.0)
    gv = _decay((2, 13, 2, 3), F64, -1.0)
    o, s = gla.fused_recurrent_gla_torch(tk["q"], tk["k"], tk["v"], gk=tk["g"], gv=gv, output_final_state=True)
    assert_close((o, s), ref_gated(tk["q"], tk["k"], tk["v"], tk["g"], 0.5, None, gv=gv), 1e-10)
    o, s = gla.fused_recurrent_gla_torch(tk["q"], tk["k"], tk["v"], gk=tk["g"], reverse=True, output_final_state=True)
    o_ref, s_ref = ref_gated(*(t.flip(1) for t in (tk["q"], tk["k"], tk["v"], tk["g"])), 0.5, None)
    assert_close((o, s), (o_ref.flip(1), s_ref), 1e-10)


def test_linear_attn_unnormalized_defaults():
    """fla's defaults: chunk normalizes, fused_recurrent does not; unnormalized state is a plain tensor."""
    seeded(8)
    q, k, v = _qkv(1, 11, 2, 4, 3, F64)
    o, s = linear_attn.fused_recurrent_linear_attn_torch(q, k, v, output_final_state=True)
    o_ref, s_ref = ref_gated(q, k, v, torch.zeros_like(q), 0.5, None)
    assert_close((o, s), (o_ref, s_ref), 1e-10)
    o, s = linear_attn.chunk_linear_attn_torch(q, k, v, normalize=False, output_final_state=True)
    assert_close((o, s), (o_ref, s_ref), 1e-10)


BAD = {
    "rank": (gla.chunk_gla_torch, lambda tk: {**tk, "q": tk["q"][0]}, "4-D"),
    "shape": (gla.chunk_gla_torch, lambda tk: {**tk, "g": tk["g"][..., :2]}, "`g` must have shape"),
    "state": (gla.chunk_gla_torch, lambda tk: {**tk, "initial_state": torch.zeros(2, 2, 3, 4)}, "[N, H, K, V]"),
    "batch-with-cu_seqlens": (
        gla.chunk_gla_torch,
        lambda tk: {**tk, "cu_seqlens": torch.tensor([0, 3, 9])},
        "batch size must be 1",
    ),
    "cu_seqlens-span": (
        gla.chunk_gla_torch,
        lambda tk: {n: t[:1] for n, t in tk.items()} | {"cu_seqlens": torch.tensor([0, 3, 8])},
        "from 0 to T=9",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises(case):
    fn, edit, msg = BAD[case]
    tk, _ = make_gla(2, 9, 2, 4, 3, F64, -1.0)
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        fn(**edit(tk))


def test_bad_input_per_family():
    q, k, v = _qkv(1, 5, 2, 4, 3, F64)
    with pytest.raises(ValueError, match=r"`g` must have shape \[B, T, H\]"):
        simple_gla.chunk_simple_gla_torch(q, k, v, g=torch.zeros(1, 5, 2, 4))
    with pytest.raises(ValueError, match=r"`u` must have shape \[H, K\]"):
        rwkv6.chunk_rwkv6_torch(q, k, v, torch.zeros_like(q), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="3-D"):
        hgrn.chunk_hgrn_torch(q, q)
    with pytest.raises(ValueError, match="normalize=True"):
        linear_attn.fused_recurrent_linear_attn_torch(q, k, v, initial_state=(torch.zeros(1, 2, 4, 3),) * 2)


def test_hgrn_uses_fla_chunk_kernel_only_without_state_gradients():
    """fla's chunk_hgrn has no cu_seqlens and drops state gradients; such calls must go to fused_recurrent_hgrn."""
    x, g = torch.randn(1, 6, 4, requires_grad=True), torch.randn(1, 6, 4)
    h0, h0_grad = torch.zeros(1, 4), torch.zeros(1, 4, requires_grad=True)
    exact = hgrn._fla_chunk_hgrn_is_exact
    assert exact(x, g, None, False, None)
    assert exact(x, g, h0, False, None)
    assert not exact(x, g, None, False, torch.tensor([0, 2, 6]))
    assert not exact(x, g, h0_grad, False, None)
    assert not exact(x, g, None, True, None)
    with torch.no_grad():
        assert exact(x, g, h0_grad, True, None)
