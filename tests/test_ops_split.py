"""`ops/split.py` on CPU in float64: chunk_gla / chunk_simple_gla of one sequence, or of packed documents of mixed
lengths (`cu_seqlens`), computed through pieces run side by side give the unsplit op's outputs, final states and
gradients (q, k, v, g, g_gamma, initial_state), for piece counts with and without a remainder and both ways of
finding the pieces' own states; the piece scan against a plain loop; the packed plan against hand-computed
offsets and its cache; the mixers' `seq_split` option against the same mixer without it, rows and packed.
(fla's kernels on CUDA: tests/gpu/test_ops_split_gpu.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from linear_moe.mixers import build_mixer
from linear_moe.ops import gla, simple_gla, split

F64 = torch.float64
B, T, H, K, V = 2, 24, 2, 4, 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaves(family: str, initial_state: bool, b: int = B, t: int = T, n: int = B) -> dict[str, torch.Tensor]:
    """Leaf tensors (requiring gradients) for one call on `[b, t]` with `n` state rows; log decays down to -1 per
    token."""
    x = {"q": torch.randn(b, t, H, K), "k": torch.randn(b, t, H, K), "v": torch.randn(b, t, H, V)}
    if family == "gla":
        x["g"] = -torch.rand(b, t, H, K)
    if family in ("simple_gla", "simple_gla+gamma"):
        x["g"] = -torch.rand(b, t, H)
    if family in ("simple_gla+gamma", "gamma"):
        x["g_gamma"] = -torch.rand(H)
    if initial_state:
        x["initial_state"] = torch.randn(n, H, K, V)
    return {n: t.to(F64).requires_grad_() for n, t in x.items()}


def run(fn, x: dict[str, torch.Tensor], **kw) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(o, final state, gradients of every leaf) of a fixed random loss over o and the final state."""
    o, s = fn(**x, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
    loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=F64)).sum()
    return o, s, dict(zip(x, torch.autograd.grad(loss, list(x.values())), strict=True))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


OPS = {
    "gla": (gla.chunk_gla, split.chunk_gla_split),
    "simple_gla": (simple_gla.chunk_simple_gla, split.chunk_simple_gla_split),
    "simple_gla+gamma": (simple_gla.chunk_simple_gla, split.chunk_simple_gla_split),
    "gamma": (simple_gla.chunk_simple_gla, split.chunk_simple_gla_split),
}


# pieces of 8 tokens: 3 pieces; 5: 5 pieces with a remainder of 4 (the last piece padded); 1: a piece per token;
# 13: 2 pieces, the second padded by 2; 40: one piece (the op itself)
@pytest.mark.parametrize("piece_len", [8, 5, 1, 13, 40])
@pytest.mark.parametrize("local", split.LOCAL)
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("family", list(OPS))
def test_split_equals_unsplit_op(family, initial_state, local, piece_len):
    whole, pieces = OPS[family]
    x = leaves(family, initial_state)
    o, s, grads = run(whole, x)
    o_split, s_split, grads_split = run(pieces, x, piece_len=piece_len, local=local)
    close(o_split, o)
    close(s_split, s)
    for name, g in grads.items():
        close(grads_split[name], g)


# packed documents: 3 and 1 tokens (shorter than any piece but 1), 0 (empty), 20, 13 and 9 (several pieces, with
# and without a remainder), 8
DOC_LENS = [3, 20, 0, 13, 1, 8, 9]
CU = torch.tensor([0, 3, 23, 23, 36, 37, 45, 54])


def packed_leaves(family: str, initial_state: bool) -> dict[str, torch.Tensor]:
    """`leaves` of one packed row `[1, sum(DOC_LENS)]` with an initial state per document."""
    return leaves(family, initial_state, 1, int(CU[-1]), len(DOC_LENS))


# pieces of 4 tokens: 20 -> 5 pieces, 13 -> 4 (the last 1 token), 9 -> 3, 8 -> 2; 8: 20 -> 3, 13 -> 2, 9 -> 2,
# 8 whole; 1: every token a piece; 64: nothing cut (the op itself)
@pytest.mark.parametrize("piece_len", [4, 8, 1, 64])
@pytest.mark.parametrize("local", split.LOCAL)
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no-h0"])
@pytest.mark.parametrize("family", [*OPS, "none"])
def test_packed_split_equals_unsplit_op(family, initial_state, local, piece_len):
    whole, pieces = OPS.get(family, OPS["simple_gla"])
    x = packed_leaves(family, initial_state)
    o, s, grads = run(whole, x, cu_seqlens=CU)
    o_split, s_split, grads_split = run(pieces, x, cu_seqlens=CU, piece_len=piece_len, local=local)
    assert s.shape == (len(DOC_LENS), H, K, V)
    close(o_split, o)
    close(s_split, s)
    for name, g in grads.items():
        close(grads_split[name], g)


def test_packed_strong_decays_stay_finite_and_exact():
    """Log decays down to -30 per token in packed documents: no NaN from the resets or the underflow."""
    x = packed_leaves("gla", True)
    with torch.no_grad():
        x["g"].mul_(30)
    o, s, grads = run(gla.chunk_gla, x, cu_seqlens=CU)
    for local in split.LOCAL:
        o_split, s_split, grads_split = run(split.chunk_gla_split, x, cu_seqlens=CU, piece_len=3, local=local)
        close(o_split, o)
        close(s_split, s)
        for name, g in grads.items():
            assert torch.isfinite(grads_split[name]).all(), name
            close(grads_split[name], g)


def test_varlen_plan_cuts_long_documents_only():
    plan = split.build_varlen_plan(CU, 8, int(CU[-1]), torch.device("cpu"))
    # 3 | 20 -> 8 8 4 | 0 | 13 -> 8 5 | 1 | 8 | 9 -> 8 1
    assert plan.cu.tolist() == [0, 3, 11, 19, 23, 23, 31, 36, 37, 45, 53, 54]
    assert plan.cu.dtype == CU.dtype and plan.cuts
    assert plan.carry_PL[:, 0].tolist() == [3, 11, 23, 45]  # the pieces that hand a state on, 8 tokens each
    assert plan.carry_PL.shape == (4, 8)
    assert plan.last_N.tolist() == [0, 3, 4, 6, 7, 8, 10]
    assert not split.build_varlen_plan(CU, 20, int(CU[-1]), torch.device("cpu")).cuts


def test_varlen_plan_is_built_once_per_cu_seqlens(monkeypatch):
    """Every layer of a forward passes the same `cu_seqlens`: one plan (one host copy), then cache hits; a new
    tensor (the next batch) or an in-place change builds a new one; the entry goes with the tensor."""
    builds = []
    build = split.build_varlen_plan
    monkeypatch.setattr(split, "build_varlen_plan", lambda *a: builds.append(a) or build(*a))
    x = {n: t.detach() for n, t in packed_leaves("gla", True).items()}
    cu = CU.clone()
    first = split.chunk_gla_split(**x, cu_seqlens=cu, piece_len=4)[0]
    for _ in range(3):
        close(split.chunk_gla_split(**x, cu_seqlens=cu, piece_len=4)[0], first)
    assert len(builds) == 1
    split.chunk_gla_split(**x, cu_seqlens=CU.clone(), piece_len=4)
    assert len(builds) == 2
    cu[1:3] = torch.tensor([10, 12])  # other documents, same tensor
    o, _ = split.chunk_gla_split(**x, cu_seqlens=cu, piece_len=4)
    assert len(builds) == 3
    close(o, gla.chunk_gla(**x, cu_seqlens=cu)[0])
    key = (id(cu), 4, int(CU[-1]))
    assert key in split._PLANS
    del cu  # the plan goes with its tensor
    assert key not in split._PLANS


def test_strong_decays_stay_finite_and_exact():
    """Log decays down to -30 per token: a piece's summed decay underflows to exact zeros, no NaN."""
    x = leaves("gla", True)
    with torch.no_grad():
        x["g"].mul_(30)
    o, s, grads = run(gla.chunk_gla, x)
    for local in split.LOCAL:
        o_split, s_split, grads_split = run(split.chunk_gla_split, x, piece_len=7, local=local)
        close(o_split, o)
        close(s_split, s)
        for name, g in grads.items():
            close(grads_split[name], g)


def test_scan_states_equals_a_loop_over_pieces():
    P = 7
    decay = -torch.rand(B, P, H, K, 1, dtype=F64)
    local = torch.randn(B, P, H, K, V, dtype=F64)
    s0 = torch.randn(B, H, K, V, dtype=F64)
    starts, S = [], s0
    for p in range(P):
        starts.append(S)
        S = decay[:, p].exp() * S + local[:, p]
    close(split.scan_states(decay, local, s0), torch.stack(starts, 1))
    close(split.scan_states(None, local, None), torch.cumsum(local, 1) - local)  # no decay: a plain prefix sum


def test_local_states_sum_keeps_float32_under_bfloat16_autocast():
    x = leaves("gla", False)
    k, v, g = (x[n].detach().float() for n in ("k", "v", "g"))
    ref = split.local_states_sum(k, v, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = split.local_states_sum(k, v, g)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ref, atol=0, rtol=0)
    _, s_op = gla.chunk_gla(k, k, v, g, output_final_state=True)
    torch.testing.assert_close(s, s_op, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_one_line_value_errors():
    x = {n: t.detach() for n, t in leaves("gla", False).items()}
    with pytest.raises(ValueError, match="chunk_gla_split: piece_len must be a positive"):
        split.chunk_gla_split(**x, piece_len=0)
    with pytest.raises(ValueError, match="local must be one of op, sum"):
        split.chunk_gla_split(**x, piece_len=8, local="probe")
    with pytest.raises(ValueError, match="with cu_seqlens the batch size must be 1"):
        split.chunk_gla_split(**x, cu_seqlens=torch.tensor([0, 10, T]), piece_len=8)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing offsets from 0 to T=24"):
        q, k, v, g = (t[:1] for t in x.values())
        split.chunk_gla_split(q, k, v, g, cu_seqlens=torch.tensor([0, 15, 10, T]), piece_len=8)
    with pytest.raises(ValueError, match=r"chunk_gla_split: `g` must have shape"):
        split.chunk_gla_split(**{**x, "g": x["g"][..., :2]}, piece_len=8)


# ---- the mixers' seq_split option ----

D = 16


def mixer_pair(name: str, **opts) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A float64 layer built with `opts` (parameters perturbed, training mode) and a copy with seq_split off."""
    m = build_mixer(name, D, H, layer_idx=1, **opts).double().train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    plain = copy.deepcopy(m)
    plain.seq_split = 0
    return plain, m


def mixer_grads(
    m: torch.nn.Module, x: torch.Tensor, state: dict, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict, dict]:
    """(y, new state, gradients of x, of the float states and of the parameters) of a fixed random loss."""
    x = x.clone().requires_grad_()
    state = {k: s.clone().requires_grad_() if s.is_floating_point() else s for k, s in state.items()}
    y, new = m(x, state=state, use_cache=True, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(2)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=F64)).sum()
    loss = loss + (new["recurrent"] * torch.randn(new["recurrent"].shape, generator=gen, dtype=F64)).sum()
    loss.backward()
    grads = {"x": x.grad, **{f"state.{k}": s.grad for k, s in state.items() if s.is_floating_point()}}
    grads |= {n: p.grad for n, p in m.named_parameters()}
    return y, new, grads


MIXER_CASES = pytest.mark.parametrize(
    "name,opts",
    [("gla", {}), ("gla", {"use_short_conv": True}), ("retnet", {}), ("lightning_attn", {"num_layers": 4})],
    ids=["gla", "gla+conv", "retnet", "lightning_attn"],
)


def assert_same_mixer_run(plain, split_, x, state, cu_seqlens=None) -> None:
    y0, s0, g0 = mixer_grads(plain, x, state, cu_seqlens)
    y1, s1, g1 = mixer_grads(split_, x, state, cu_seqlens)
    close(y1, y0)
    assert s1.keys() == s0.keys()
    for key in s0:
        close(s1[key], s0[key])
    for name_, g in g0.items():
        assert g is not None and g1[name_] is not None, name_
        # GLA's layer makes its gate in float32, so the gradients behind it carry float32 rounding of sums that
        # the two runs order differently (relative 1e-9 to 5e-8 here; a wrong split is off by O(1))
        torch.testing.assert_close(g1[name_], g, atol=1e-6 * g.abs().max().item(), rtol=1e-6)


def random_state(m: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    return {k: torch.randn_like(s) if s.is_floating_point() else s for k, s in m.init_state(n, "cpu", F64).items()}


@pytest.mark.parametrize("local", split.LOCAL)
@MIXER_CASES
def test_mixer_seq_split_equals_unsplit(name, opts, local):
    plain, split_ = mixer_pair(name, **opts, seq_split=6, seq_split_local=local)
    x = torch.randn(B, 21, D, dtype=F64)  # pieces of 6 tokens, the last one padded
    assert_same_mixer_run(plain, split_, x, random_state(plain, B))


@pytest.mark.parametrize("local", split.LOCAL)
@MIXER_CASES
def test_mixer_seq_split_packed_equals_unsplit(name, opts, local):
    """Packed documents (a state row each): the long ones are cut into pieces of 6, the short ones run whole."""
    plain, split_ = mixer_pair(name, **opts, seq_split=6, seq_split_local=local)
    x = torch.randn(1, int(CU[-1]), D, dtype=F64)
    assert_same_mixer_run(plain, split_, x, random_state(plain, len(DOC_LENS)), CU)


def test_mixer_seq_split_runs_unsplit_when_short(monkeypatch):
    """An input no longer than one piece, packed or not: the plain op, and no plan (no host read of cu_seqlens)."""
    monkeypatch.setattr(split, "varlen_plan", None)  # calling it fails the test
    plain, split_ = mixer_pair("gla", seq_split=20)
    x = torch.randn(1, 20, D, dtype=F64)
    cu = torch.tensor([0, 9, 20])
    close(split_(x, cu_seqlens=cu)[0], plain(x, cu_seqlens=cu)[0])
    close(split_(x)[0], plain(x)[0])


@pytest.mark.parametrize("name", ["gla", "retnet", "lightning_attn"])
def test_mixer_seq_split_option_errors(name):
    with pytest.raises(ValueError, match="seq_split must be a number of tokens"):
        build_mixer(name, D, H, seq_split=-1)
    with pytest.raises(ValueError, match="seq_split_local must be one of op, sum"):
        build_mixer(name, D, H, seq_split=8, seq_split_local="probe")
