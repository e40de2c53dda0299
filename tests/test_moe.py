"""Tests for linear_moe.moe: routers, grouped experts, dispatch/capacity, balance losses, MoELayer (CPU, tiny)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.moe import MoEConfig, MoELayer, balance, grouped_matmul, moe_param_counts, moe_preset, route
from linear_moe.moe.dispatch import dispatch, gather_rows
from linear_moe.moe.experts import GroupedExperts, grouped_matmul_wgrad, grouped_mm_supported

FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"]


def tiny(family: str, **kw) -> MoEConfig:
    base = dict(num_experts=8, top_k=2, expert_ffn_hidden_size=12, init_std=0.1)
    return moe_preset(family, **{**base, **kw})


def loop_matmul(x_NK, w_EKM, counts_E):
    out, start = [], 0
    for e, c in enumerate(counts_E.tolist()):
        out.append(x_NK[start : start + c] @ w_EKM[e])
        start += c
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_grouped_matmul_matches_loop(backend):
    if backend == "grouped_mm" and not grouped_mm_supported(torch.zeros(1, 8), torch.zeros(1, 8, 4)):
        pytest.skip("torch._grouped_mm unavailable for CPU float32 in this torch")
    torch.manual_seed(0)
    counts_E = torch.tensor([3, 0, 5, 1, 7])  # an empty expert included
    x = torch.randn(int(counts_E.sum()), 8, requires_grad=True)
    w = torch.randn(5, 8, 12, requires_grad=True)
    g = torch.randn(x.shape[0], 12)
    y = grouped_matmul(x, w, counts_E, backend)
    ref = loop_matmul(x, w, counts_E)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g))


@pytest.mark.parametrize("backend", ["grouped_mm", "bmm"])
def test_grouped_matmul_wgrad_matches_loop(backend):
    """The weight gradient of `grouped_matmul` (what `_RoutedSwiGLU`'s backward runs) == x_e^T g_e per expert."""
    if backend == "grouped_mm" and not grouped_mm_supported(torch.zeros(1, 8), torch.zeros(1, 8, 4)):
        pytest.skip("torch._grouped_mm unavailable for CPU float32 in this torch")
    torch.manual_seed(0)
    counts_E = torch.tensor([3, 0, 5, 1, 7])
    x, g = torch.randn(16, 8), torch.randn(16, 12)
    starts = [0, *torch.cumsum(counts_E, 0).tolist()]
    ref = torch.stack([x[a:b].T @ g[a:b] for a, b in zip(starts, starts[1:], strict=False)])
    torch.testing.assert_close(grouped_matmul_wgrad(x, g, counts_E, backend), ref)
    assert grouped_matmul_wgrad(x[:0], g[:0], torch.zeros(5, dtype=torch.int64), backend).abs().sum() == 0


@pytest.mark.parametrize("backend", ["auto", "bmm"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
@pytest.mark.parametrize("regather", [True, False], ids=["source", "rows"])
def test_routed_experts_match_autograd_of_the_plain_ops(backend, weighted, regather):
    """`GroupedExperts` with row weights and a row source (its hand-written backward recomputes the SwiGLU output
    and the rows) == autograd through x_TD[token] -> per-expert SwiGLU MLP -> * weight, values and all gradients."""
    torch.manual_seed(0)
    E, D, F_, T = 4, 8, 6, 9
    experts = GroupedExperts(E, D, F_, backend)
    torch.nn.init.normal_(experts.w13, std=0.3)
    torch.nn.init.normal_(experts.w2, std=0.3)
    token_N = torch.tensor([0, 3, 8, 1, 1, 2, 5, 7, 4, 6, 0, 2])  # sorted by expert below; token 1 twice
    counts_E = torch.tensor([3, 0, 5, 4])
    x_TD = torch.randn(T, D, requires_grad=True)
    w_N = torch.rand(12, requires_grad=True)
    y = experts(x_TD[token_N], counts_E, w_N if weighted else None, (x_TD, token_N) if regather else None)
    x_ND, rows, start = x_TD[token_N], [], 0
    for e, c in enumerate(counts_E.tolist()):
        h = x_ND[start : start + c] @ experts.w13[e]
        rows.append((F.silu(h[:, :F_]) * h[:, F_:]) @ experts.w2[e])
        start += c
    ref = torch.cat(rows) * (w_N[:, None] if weighted else 1)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x_TD, experts.w13, experts.w2] + ([w_N] if weighted else [])
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b)


def test_layer_keeps_only_gate_up_of_the_expert_rows():
    """What one MoE layer saves for backward, counted by hand: of the [N = T*k, ...] tensors only the gate | up
    output [N, 2F] and the N router weights; no [N, D] rows, no [N, F] SwiGLU output, no [N, D] expert output."""
    torch.manual_seed(0)
    cfg = tiny("qwen2_moe", expert_ffn_hidden_size=12, top_k=2)
    layer = MoELayer(cfg, 16)
    T, k, F_ = 10, 2, 12
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(torch.randn(1, T, 16, requires_grad=True))
    rows = [t for t in saved.values() if t.dtype.is_floating_point and t.dim() and t.shape[0] == T * k]
    assert sorted(t.numel() for t in rows) == [T * k, T * k * 2 * F_]


def reference_layer(layer: MoELayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Token-by-token, expert-by-expert: y_t = sum_k w_tk * SwiGLU_e(x_t) (+ gated shared expert)."""
    cfg = layer.cfg
    x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
    r = route(x_TD.float() @ layer.router.weight.float().T, cfg, layer.expert_bias)
    F_ = cfg.expert_ffn_hidden_size
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for e, w in zip(r.experts_TK[t].tolist(), r.weights_TK[t], strict=True):
            h = x_TD[t] @ layer.experts.w13[e]
            y = y + w * ((F.silu(h[:F_]) * h[F_:]) @ layer.experts.w2[e])
        if layer.shared_experts is not None:
            s = layer.shared_experts
            sh = s.down_proj.weight @ (F.silu(s.gate_proj.weight @ x_TD[t]) * (s.up_proj.weight @ x_TD[t]))
            if layer.shared_expert_gate is not None:
                sh = sh * torch.sigmoid(layer.shared_expert_gate.weight[0] @ x_TD[t])
            y = y + sh
        rows.append(y)
    return torch.stack(rows).view_as(x_BTD)


@pytest.mark.parametrize("backend", ["auto", "bmm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_matches_per_token_loop(family, backend):
    torch.manual_seed(0)
    layer = MoELayer(tiny(family), 16, backend=backend)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y, aux = layer(x)
    ref = reference_layer(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y)
    params = [x, layer.experts.w13, layer.experts.w2, layer.router.weight]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert aux.load.sum() == 10 * 2 and aux.load.shape == (8,)


def test_mixtral_router_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 1.0]])
    r = route(logits, tiny("mixtral", num_experts=4))
    assert r.experts_TK.tolist() == [[0, 1], [1, 3]]
    s = 1 / (1 + math.exp(-1))  # e^2 / (e^2 + e^1)
    s2 = 1 / (1 + math.exp(-2))  # e^3 / (e^3 + e^1)
    torch.testing.assert_close(r.weights_TK, torch.tensor([[s, 1 - s], [s2, 1 - s2]]))


def test_qwen2_router_hand_no_renorm():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    r = route(logits, tiny("qwen2_moe", num_experts=4))
    z = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    assert r.experts_TK.tolist() == [[0, 1]]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[math.exp(2) / z, math.exp(1) / z]]))


def test_deepseek_v2_group_limited_hand():
    # groups of 2: g0 max 5, g1 max 4.9, g2 max 4.85, g3 max 0.2 -> keep g0, g1 (topk_group=2)
    logits = torch.tensor([[5.0, 1.0, 4.9, 0.5, 0.0, 4.85, 0.1, 0.2]])
    cfg = tiny("deepseek_v2", top_k=3, n_group=4, topk_group=2)
    r = route(logits, cfg)
    assert r.experts_TK.tolist() == [[0, 2, 1]]  # without groups expert 5 (4.85) would beat expert 1
    p = [math.exp(v) for v in logits[0].tolist()]
    expected = [16.0 * p[i] / sum(p) for i in (0, 2, 1)]  # softmax over all 8, no renorm, scaling factor 16
    torch.testing.assert_close(r.weights_TK, torch.tensor([expected]))


def test_deepseek_v3_top2_sum_groups_and_weights():
    # g0 has the single best expert but g1 the larger sum of its two best sigmoid scores
    logits = torch.tensor([[3.0, -3.0, -3.0, -3.0, 2.0, 2.0, -3.0, -3.0]])
    cfg = tiny("deepseek_v3", n_group=2, topk_group=1)
    r = route(logits, cfg)
    assert sorted(r.experts_TK[0].tolist()) == [4, 5]
    torch.testing.assert_close(r.weights_TK, torch.tensor([[1.25, 1.25]]))  # normalised 0.5 each x 2.5
    r_max = route(logits, dataclasses.replace(cfg, group_score="max"))
    assert 0 in r_max.experts_TK[0].tolist()


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited_never_outside_kept_groups(group_score):
    torch.manual_seed(1)
    cfg = tiny("deepseek_v3", num_experts=16, top_k=4, n_group=4, topk_group=2, group_score=group_score)
    logits = torch.randn(64, 16)
    r = route(logits, cfg)
    s = torch.sigmoid(logits)
    for t in range(64):
        per_group = [sorted(s[t, 4 * g : 4 * g + 4].tolist(), reverse=True) for g in range(4)]
        score = [v[0] if group_score == "max" else v[0] + v[1] for v in per_group]
        kept = sorted(range(4), key=lambda g: -score[g])[:2]
        assert {e // 4 for e in r.experts_TK[t].tolist()} <= set(kept)


def test_expert_bias_changes_selection_not_weights():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5]])
    cfg = tiny("deepseek_v3", num_experts=4, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])
    r0, r1 = route(logits, cfg), route(logits, cfg, bias)
    assert sorted(r0.experts_TK[0].tolist()) == [0, 1] and sorted(r1.experts_TK[0].tolist()) == [0, 3]
    s = torch.sigmoid(logits[0])
    torch.testing.assert_close(r1.weights_TK[0].sort().values, torch.stack([s[3], s[0]]).sort().values)


def test_autocast_bf16_router_float32():
    """Under bf16 autocast the router logits stay float32 and the experts run in bf16 (close to float32)."""
    torch.manual_seed(0)
    layer = MoELayer(tiny("mixtral"), 16)
    x = torch.randn(1, 6, 16)
    y32, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x[0])
        y16, _ = layer(x)
    assert r.logits_TE.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() < 2e-2 * y32.norm()


def test_router_keeps_bf16_input_and_matches_float32_linear():
    """Under bf16 autocast the router computes float32 logits but keeps its bf16 input for backward (no float32
    copy of [T, D]); logits and gradients == autograd of F.linear(x.float(), w)."""
    torch.manual_seed(0)
    layer = MoELayer(tiny("qwen2_moe"), 16)
    x = torch.randn(7, 16).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        r = layer.router(x)
    assert r.logits_TE.dtype == torch.float32
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.bfloat16]
    ref = F.linear(x.float(), layer.router.weight)
    torch.testing.assert_close(r.logits_TE, ref)
    g = torch.randn_like(ref)
    params = (x, layer.router.weight)
    for a, b in zip(torch.autograd.grad(r.logits_TE, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b)


def test_update_bias_sign_rule():
    layer = MoELayer(tiny("deepseek_v3", num_experts=4, n_group=1, topk_group=1), 8)
    layer.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    torch.testing.assert_close(layer.expert_bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    off = MoELayer(tiny("mixtral", num_experts=4), 8)
    off.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    assert off.expert_bias.abs().sum() == 0
    assert "expert_bias" in layer.state_dict()
    assert layer.bfloat16().expert_bias.dtype == torch.float32  # 1e-3 steps would vanish in bf16


def test_bias_updates_balance_a_skewed_router():
    """Aux-loss-free balancing alone (no gradient step) spreads a router that sends everything to expert 0."""
    torch.manual_seed(0)
    layer = MoELayer(tiny("deepseek_v3", num_experts=4, top_k=1, n_group=1, topk_group=1, bias_update_rate=0.02), 8)
    with torch.no_grad():
        layer.router.weight.mul_(5.0)
        layer.router.weight[0, 0] = 3.0
    x = torch.randn(1, 64, 8)
    x[..., 0] = x[..., 0].abs() + 0.5
    first = layer(x)[1].load
    for _ in range(50):
        layer.update_bias(layer(x)[1].load)
    last = layer(x)[1].load
    assert first[0] > 56 and last.max() <= 24  # 64 tokens over 4 experts: 16 each when even
    assert layer.expert_bias[0] < 0 < layer.expert_bias[1:].min()


@pytest.mark.parametrize("policy,kept", [("weight", [1, 3, 4]), ("position", [0, 1, 4])])
def test_capacity_drops_expected_tokens(policy, kept):
    # 5 tokens, k=1, E=2, cf=0.8 -> capacity ceil(0.8 * 5 / 2) = 2; tokens 0-3 -> expert 0, token 4 -> expert 1
    experts = torch.tensor([[0], [0], [0], [0], [1]])
    weights = torch.tensor([[0.6], [0.9], [0.7], [0.8], [0.5]])
    d = dispatch(experts, weights, 2, capacity_factor=0.8, drop_policy=policy)
    assert d.token_N.tolist() == kept and d.counts_E.tolist() == [2, 1]


def test_capacity_in_layer_zeroes_dropped_tokens():
    torch.manual_seed(0)
    # capacity ceil(0.5 * 12 / 4) = 2; weights not renormalised, so they grow with x[0]
    cfg = tiny("mixtral", num_experts=4, top_k=1, capacity_factor=0.5, norm_topk_prob=False)
    layer = MoELayer(cfg, 8)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    x = torch.randn(1, 12, 8)
    x[0, :, 0] = torch.linspace(0.1, 1.2, 12)
    y, aux = layer(x)
    assert int(aux.dropped) == 10
    assert (y[0, :10].abs().sum(-1) == 0).all() and (y[0, 10:].abs().sum(-1) > 0).all()  # highest weights kept


def test_balance_losses_hand():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.5, 0.1]])
    experts = torch.tensor([[0], [0], [1], [2]])
    f = [0.5, 0.25, 0.25, 0.0]
    P = [0.35, 0.3, 0.25, 0.1]
    expected = 4 * sum(a * b for a, b in zip(f, P, strict=True))
    torch.testing.assert_close(balance.balance_loss(probs, experts), torch.tensor(expected))
    dev = (4 * (f[0] + f[1]) / 2) * (P[0] + P[1]) + (4 * (f[2] + f[3]) / 2) * (P[2] + P[3])
    torch.testing.assert_close(balance.device_balance_loss(probs, experts, 2), torch.tensor(dev))
    seq = balance.seq_balance_loss(probs, experts, *balance.sequence_rows(2, 2, None))
    row0 = 4 * (1.0 * 0.55)  # both tokens -> expert 0, P_0 = (0.7 + 0.4) / 2
    row1 = 4 * (0.5 * 0.4 + 0.5 * 0.35)  # experts 1, 2; P_1 = (0.6 + 0.2) / 2, P_2 = (0.2 + 0.5) / 2
    torch.testing.assert_close(seq, torch.tensor((row0 + row1) / 2))


def test_sequence_rows_hand():
    # 2 rows of 8 tokens in sequences of 3 (a last one of 2): 3 sequences a row
    row, n = balance.sequence_rows(2, 8, 3)
    assert n == 6 and row.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    # rank 1 of 2 context-parallel slices of those rows: tokens 4..7 of each row
    row, n = balance.sequence_rows(2, 4, 3, rank=1, size=2)
    assert n == 6 and row.tolist() == [1, 1, 2, 2, 4, 4, 5, 5]
    assert balance.sequence_rows(1, 5, None)[0].tolist() == [0] * 5  # one sequence a row
    assert balance.sequence_rows(1, 1, 16)[1] == 1  # a decode step: a sequence shorter than seq_len


def test_seq_balance_loss_is_per_training_sequence():
    """A packed [1, B*T] batch with `seq_len=T` has the loss of its B rows given as [B, T], the mean of each row's
    `balance_loss`; without `seq_len` the packed row is one sequence (the batch-wise loss)."""
    torch.manual_seed(0)
    layer = MoELayer(tiny("deepseek_v3", n_group=1, topk_group=1, balance_coef=1.0), 8)
    x = torch.randn(3, 10, 8)
    _, rows = layer(x)
    r = layer.router(x.reshape(-1, 8), layer.expert_bias)
    probs = balance.balance_probs(r.scores_TE, "sigmoid")
    per_row = [
        balance.balance_loss(p, e) for p, e in zip(probs.view(3, 10, -1), r.experts_TK.view(3, 10, -1), strict=True)
    ]
    torch.testing.assert_close(rows.balance, torch.stack(per_row).mean())
    _, whole = layer(x.reshape(1, 30, 8))
    torch.testing.assert_close(whole.balance, balance.balance_loss(probs, r.experts_TK))
    layer.seq_len = 10
    _, packed = layer(x.reshape(1, 30, 8))
    torch.testing.assert_close(packed.balance, rows.balance)


def test_z_loss_hand_and_in_aux():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]
    torch.testing.assert_close(balance.z_loss(logits), torch.tensor((lse[0] ** 2 + lse[1] ** 2) / 2))
    torch.manual_seed(0)
    layer = MoELayer(tiny("mixtral", z_loss_coef=0.01, balance_coef=0.02), 8)
    x = torch.randn(1, 6, 8)
    _, aux = layer(x)
    logits = x[0] @ layer.router.weight.T
    torch.testing.assert_close(aux.z_loss, balance.z_loss(logits))
    torch.testing.assert_close(aux.loss, 0.01 * aux.z_loss + 0.02 * aux.balance)
    aux.loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_sigmoid_balance_uses_normalised_scores():
    s = torch.tensor([[0.5, 0.25, 0.25, 0.0]]) * 2
    torch.testing.assert_close(balance.balance_probs(s, "sigmoid"), torch.tensor([[0.5, 0.25, 0.25, 0.0]]))


def test_tiny_layer_trains_on_toy_regression():
    torch.manual_seed(0)
    layer = MoELayer(tiny("qwen2_moe", balance_coef=0.01, z_loss_coef=1e-3), 8)
    x = torch.randn(4, 16, 8)
    target = torch.tanh(x @ torch.randn(8, 8))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        y, aux = layer(x)
        loss = F.mse_loss(y, target)
        opt.zero_grad()
        (loss + aux.loss).backward()
        opt.step()
        layer.update_bias(aux.load)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_round_trip_and_counts():
    for family in FAMILIES:
        cfg = tiny(family)
        assert MoEConfig(**dataclasses.asdict(cfg)) == cfg
        layer = MoELayer(cfg, 16)
        c = moe_param_counts(cfg, 16)
        assert c["experts_total"] + c["router"] + c["shared"] == sum(p.numel() for p in layer.parameters())
    assert MoEConfig.preset("qwen2-moe").family == "qwen2_moe"
    assert moe_preset("qwen2_moe", expert_ffn_hidden_size=352).shared_expert_ffn_hidden_size == 1408


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(family="mixtral", num_experts=4, top_k=5),
        dict(family="deepseek_v2", num_experts=8, n_group=3),
        dict(family="switch"),
        dict(family="mixtral", score_func="relu"),
        dict(family="mixtral", num_experts=8, top_k=4, n_group=4, topk_group=1),
        dict(family="mixtral", num_experts=8, num_devices=3),
        dict(family="mixtral", capacity_factor=0.0),
        dict(family="mixtral", drop_policy="random"),
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        MoEConfig(**kwargs)


def test_unknown_preset_override_raises():
    with pytest.raises(ValueError, match="unknown MoEConfig fields"):
        moe_preset("mixtral", num_expert=4)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_gather_rows_backward_equals_autograd_indexing(capacity_factor):
    torch.manual_seed(4)
    T, D, E, k = 11, 6, 4, 3
    experts = torch.rand(T, E).argsort(-1)[:, :k]
    weights = torch.rand(T, k)
    d = dispatch(experts, weights, E, capacity_factor)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(d.token_N.numel(), D, dtype=torch.float64)
    (ours,) = torch.autograd.grad(gather_rows(x, d), x, g)
    (want,) = torch.autograd.grad(x[d.token_N], x, g)
    torch.testing.assert_close(gather_rows(x, d), x[d.token_N])
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_combine_and_its_gradients_equal_a_weighted_index_add(capacity_factor):
    # reference: out[t] += w(t, e) * y_e(t) over the kept assignments, through autograd's own index_add
    from linear_moe.moe.dispatch import combine

    torch.manual_seed(5)
    T, D, E, k = 13, 5, 4, 3
    experts = torch.rand(T, E).argsort(-1)[:, :k]
    weights = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    d = dispatch(experts, weights.detach(), E, capacity_factor)
    assert (d.inverse_Tk is None) == (capacity_factor is not None)
    y = torch.randn(d.token_N.numel(), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, D, dtype=torch.float64)
    ours = combine(y, d, weights)
    want = torch.zeros(T, D, dtype=torch.float64).index_add(0, d.token_N, weights.reshape(-1)[d.slot_N, None] * y)
    torch.testing.assert_close(ours, want)
    for a, b in zip(
        torch.autograd.grad(ours, (y, weights), g), torch.autograd.grad(want, (y, weights), g), strict=True
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_row_map_and_kernel_switch(capacity_factor, monkeypatch):
    """`Dispatch.row_Tk`, the row map of the Triton combine (`moe/kernels.py`, checked in tests/gpu): the dispatch
    position of each kept assignment, -1 where dropped. CPU tensors and the kill switch take the PyTorch path."""
    from linear_moe.moe import kernels

    torch.manual_seed(6)
    T, E, k = 17, 4, 2
    experts = torch.rand(T, E).argsort(-1)[:, :k]
    d = dispatch(experts, torch.rand(T, k), E, capacity_factor)
    want = torch.full((T * k,), -1)
    want[d.slot_N] = torch.arange(d.slot_N.numel())
    assert torch.equal(d.row_Tk, want) and int((d.row_Tk >= 0).sum()) == int(d.kept)
    assert (capacity_factor is None) == bool((d.row_Tk >= 0).all())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LINEAR_MOE_MOE_KERNELS", raising=False)
    assert not kernels.use_moe_kernels(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LINEAR_MOE_MOE_KERNELS", "0")
    assert not kernels.use_moe_kernels(torch.zeros(1))
