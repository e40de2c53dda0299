"""The MoE Triton kernels (`moe/kernels.py`) against the PyTorch path (`LINEAR_MOE_MOE_KERNELS=0`) in float64.

Combine forward and the gradients of the expert rows y and the router weights, the token gather's x gradient, the
whole `MoELayer`, torch.compile and the custom ops' registrations; dropless and capacity-dropping dispatches, T not
a multiple of the blocks, D not a power of two, k not a power of two, bf16 and float32 rows, float32 and bf16
router weights. On the GPU machine:

    pytest -m gpu tests/gpu/test_moe_kernels_gpu.py

Without a GPU the same tests run on CPU tensors under Triton's interpreter (triton installed; a few minutes):

    TRITON_INTERPRET=1 pytest -m gpu tests/gpu/test_moe_kernels_gpu.py
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from linear_moe.moe import MoELayer, kernels, moe_preset
from linear_moe.moe.dispatch import combine, dispatch, gather_rows
from linear_moe.moe.experts import GroupedExperts

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or not (torch.cuda.is_available() or INTERPRET),
        reason="needs triton and CUDA (or TRITON_INTERPRET=1 for Triton's CPU interpreter)",
    ),
]

# (T, D, E, k): one token; T not a multiple of the token block with D=96 (not a power of two) and k=6 (not a power
# of two either) or k=1 (Switch); the A0.3B-2B and A1B-7B widths
SHAPES = [(1, 96, 8, 2), (37, 96, 16, 6), (19, 96, 4, 1), (300, 1024, 64, 8), (133, 2048, 64, 8)]
SHAPE_IDS = [f"T{t}-D{d}-E{e}-k{k}" for t, d, e, k in SHAPES]
DROPS = [None, 0.5]  # dropless, and a capacity that drops about half of the assignments
DROP_IDS = ["dropless", "capacity0.5"]


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv("LINEAR_MOE_MOE_KERNELS", raising=False)
    monkeypatch.delenv("LINEAR_MOE_KERNELS", raising=False)


def torch_path(fn, *args):
    """`fn(*args)` with the kernels switched off (the PyTorch path)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LINEAR_MOE_MOE_KERNELS", "0")
        return fn(*args)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def routed(T: int, E: int, k: int, capacity_factor: float | None, seed: int = 0):
    """A random top-k routing's dispatch and its router weights (positive, float32)."""
    g = torch.Generator().manual_seed(seed)
    experts_TK = torch.rand(T, E, generator=g).argsort(-1)[:, :k].to(DEVICE)
    weights_TK = torch.rand(T, k, generator=g).softmax(-1).to(DEVICE)
    d = dispatch(experts_TK, weights_TK, E, capacity_factor)
    if capacity_factor is not None and T > 1:
        assert d.token_N.numel() < T * k  # something was dropped
    return d, weights_TK


def tol(dtype: torch.dtype) -> float:
    # bf16: one rounding of a float32 sum, at most 2^-8 relative (Triton's interpreter truncates: 2^-7);
    # float32: reordered float32 sums
    if dtype == torch.bfloat16:
        return 1e-2 if INTERPRET else 5e-3
    return 1e-5


@pytest.mark.parametrize("capacity_factor", DROPS, ids=DROP_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("weights_dtype", ["fp32", "like-y"])
def test_combine_forward_and_gradients(capacity_factor, shape, dtype, weights_dtype):
    T, D, E, k = shape
    d, w = routed(T, E, k, capacity_factor)
    w = (w if weights_dtype == "fp32" else w.to(dtype)).requires_grad_()
    y = torch.randn(d.token_N.numel(), D, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(T, D, device=DEVICE, dtype=dtype)
    assert kernels.use_moe_kernels(y)
    out = combine(y, d, w)
    dy, dw = torch.autograd.grad(out, (y, w), g)
    assert out.dtype == dy.dtype == dtype and dw.dtype == w.dtype

    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch_path(combine, y64, d, w64)
    ref_dy, ref_dw = torch.autograd.grad(ref, (y64, w64), g.double())
    assert rel_err(out, ref) < tol(dtype)
    assert rel_err(dy, ref_dy) < tol(dtype)
    # dw: a float32 dot of bf16 values, kept in the weights' dtype (the PyTorch path rounds it to bf16 first)
    assert rel_err(dw, ref_dw) < (1e-5 if w.dtype == torch.float32 else tol(dtype))
    if capacity_factor is not None:  # dropped slots (some, unless T = 1: `routed`) get no gradient at all
        assert (dw.reshape(-1)[d.row_Tk < 0] == 0).all()


@pytest.mark.parametrize("capacity_factor", DROPS, ids=DROP_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gather_rows_gradient(capacity_factor, shape, dtype):
    """`_GatherRows` backward (the gather-sum with unit weights) == autograd's own backward of x[token_N]."""
    T, D, E, k = shape
    d, _ = routed(T, E, k, capacity_factor, seed=1)
    x = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(d.token_N.numel(), D, device=DEVICE, dtype=dtype)
    rows = gather_rows(x, d)
    assert torch.equal(rows, x.detach()[d.token_N])
    (dx,) = torch.autograd.grad(rows, x, g)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(x64[d.token_N], x64, g.double())
    assert dx.dtype == dtype and rel_err(dx, ref) < tol(dtype)
    (torch_dx,) = torch.autograd.grad(torch_path(gather_rows, x, d), x, g)
    assert rel_err(dx, torch_dx) < 2 * tol(dtype)


@pytest.mark.parametrize("capacity_factor", DROPS, ids=DROP_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_unit_weight_gather_sum_and_its_gradient(capacity_factor, dtype):
    """The gather-sum without weights (the gather's backward) == the combine with weights 1, gradient included."""
    T, D, E, k = 37, 96, 16, 6
    d, _ = routed(T, E, k, capacity_factor, seed=4)
    y = torch.randn(d.token_N.numel(), D, device=DEVICE, dtype=dtype, requires_grad=True)
    g = torch.randn(T, D, device=DEVICE, dtype=dtype)
    out = kernels.gather_sum(y, d.row_Tk.view(T, k), None)
    (dy,) = torch.autograd.grad(out, y, g)
    y64 = y.detach().double().requires_grad_()
    ref = torch_path(combine, y64, d, torch.ones(T, k, device=DEVICE, dtype=torch.float64))
    (ref_dy,) = torch.autograd.grad(ref, y64, g.double())
    assert rel_err(out, ref) < tol(dtype) and rel_err(dy, ref_dy) < tol(dtype)


@pytest.mark.parametrize("capacity_factor", DROPS, ids=DROP_IDS)
def test_layer_runs_the_kernels_and_matches_torch_path(capacity_factor, monkeypatch):
    """A whole MoELayer fwd+bwd: two gather-sums per call (combine, gather backward) and the weighted SwiGLU kernels,
    same values and gradients as the PyTorch path."""
    torch.manual_seed(0)
    cfg = moe_preset("deepseek_v3", num_experts=16, top_k=4, expert_ffn_hidden_size=64, capacity_factor=capacity_factor)
    layer = MoELayer(cfg, 96).to(DEVICE)
    x = torch.randn(2, 45, 96, device=DEVICE, requires_grad=True)

    def step():
        y, aux = layer(x)
        loss = y.square().mean() + aux.loss
        return (y, *torch.autograd.grad(loss, (x, layer.router.weight, layer.experts.w13)))

    calls = []
    op = kernels.gather_sum
    monkeypatch.setattr(kernels, "gather_sum", lambda *a: calls.append(a[2] is None) or op(*a))
    got = step()
    # the experts apply the router weights (`row_weights`): the combine and the gather's backward are plain sums
    assert calls == [True, True]
    for a, b in zip(got, torch_path(step), strict=True):
        assert rel_err(a, b) < 1e-5


def test_combine_under_torch_compile():
    """torch.compile(fullgraph=True) keeps the custom op as one call (no graph break) with the same results."""
    T, D, E, k = 67, 96, 16, 4
    d, w = routed(T, E, k, None, seed=2)
    w = w.requires_grad_()
    x = torch.randn(T, D, device=DEVICE, requires_grad=True)

    def fn(x, w):
        return combine(gather_rows(x, d).sin(), d, w)

    g = torch.randn(T, D, device=DEVICE)
    eager = (fn(x, w), *torch.autograd.grad(fn(x, w), (x, w), g))
    compiled_fn = torch.compile(fn, fullgraph=True)
    out = compiled_fn(x, w)
    compiled = (out, *torch.autograd.grad(out, (x, w), g))
    for a, b in zip(compiled, eager, strict=True):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "unit"])
def test_custom_op_registrations(weighted):
    """torch.library.opcheck: schema, fake (meta) implementation and autograd formula of the custom op."""
    T, D, E, k = 21, 96, 8, 3
    d, w = routed(T, E, k, 0.5, seed=3)
    y = torch.randn(d.token_N.numel(), D, device=DEVICE, requires_grad=True)
    w = w.requires_grad_() if weighted else None
    torch.library.opcheck(kernels.gather_sum, (y, d.row_Tk.view(T, k), w))


# (N, F): one row; N not a multiple of the row block with F not a multiple of the column block; A0.3B-2B's F
SWIGLU_SHAPES = [(1, 96), (37, 200), (300, 896)]


@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=[f"N{n}-F{f}" for n, f in SWIGLU_SHAPES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weights", "no-weights"])
def test_weighted_swiglu_kernels_match_float64_autograd(shape, dtype, weighted):
    """`routed_swiglu` and `routed_swiglu_backward` (a recomputed, dh, dw) == float64 autograd of
    silu(gate) * up * w."""
    N, F = shape
    h = torch.randn(N, 2 * F, device=DEVICE, dtype=dtype)
    w = torch.rand(N, device=DEVICE) if weighted else None
    da = torch.randn(N, F, device=DEVICE, dtype=dtype)
    assert kernels.use_moe_kernels(h)
    a = kernels.routed_swiglu(h, w)
    a2, dh, dw = kernels.routed_swiglu_backward(h, w, da, need_dw=True)

    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_() if weighted else None
    gate, up = h64.chunk(2, -1)
    ref = torch.nn.functional.silu(gate) * up * (w64[:, None] if weighted else 1)
    grads = torch.autograd.grad(ref, [h64] + ([w64] if weighted else []), da.double())
    assert a.dtype == a2.dtype == dh.dtype == dtype
    assert rel_err(a, ref) < tol(dtype) and torch.equal(a, a2)
    assert rel_err(dh, grads[0]) < tol(dtype)
    if weighted:
        assert dw.dtype == torch.float32 and rel_err(dw, grads[1]) < 1e-5
    else:
        assert dw is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_routed_experts_kernels_match_torch_path(dtype):
    """`GroupedExperts` with row weights and a row source: the kernels' forward and every gradient == the PyTorch
    path (the same hand-written backward, PyTorch's SwiGLU)."""
    torch.manual_seed(0)
    E, D, F, T = 8, 96, 200, 50
    experts = GroupedExperts(E, D, F).to(DEVICE)
    torch.nn.init.normal_(experts.w13, std=0.1)
    torch.nn.init.normal_(experts.w2, std=0.1)
    d, w_TK = routed(T, E, 4, None, seed=3)
    x_TD = torch.randn(T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    w_N = w_TK.reshape(-1)[d.slot_N].requires_grad_()
    experts = experts.to(dtype)

    def run():
        y = experts(x_TD[d.token_N], d.counts_E, w_N, (x_TD, d.token_N))
        return (y, *torch.autograd.grad(y.float().square().sum(), (x_TD, experts.w13, experts.w2, w_N)))

    for a, b in zip(run(), torch_path(run), strict=True):
        assert rel_err(a, b) < 2 * tol(dtype)
