"""fla's Triton kernels (reached through our public `chunk_*` / `fused_recurrent_*` on CUDA) against our PyTorch
chunked form `chunk_*_torch` on the same CUDA inputs: outputs, final states and the gradients of every input.

fla runs in bf16; the reference runs in fp32 from the same bf16 values. Errors are relative (||a - b|| / ||b||).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import gla, hgrn, linear_attn, rwkv6, simple_gla
from linear_moe.ops._dispatch import use_fla

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, T, H, K, V = 2, 300, 4, 64, 64  # T is not a multiple of fla's chunk size 64
DOCS = [37, 113, 150]  # packed case: B = 1, T = 300
TOL_OUT, TOL_GRAD = 1e-2, 2e-2  # bf16 kernel vs fp32 reference; gate gradients are the noisiest
BF16 = torch.bfloat16


@dataclass
class Case:
    """Leaf tensors for one op and how to turn them into keyword arguments for each call."""

    chunk: Callable[..., Any]  # public op (fla on CUDA)
    recurrent: Callable[..., Any]  # public fused_recurrent twin
    reference: Callable[..., Any]  # our chunk_*_torch
    make: Callable[[int, int, int], dict[str, torch.Tensor]]  # (batch, time, n_states) -> leaves
    kwargs: Callable[[dict[str, torch.Tensor], bool], dict[str, Any]]  # (leaves, recurrent) -> call kwargs
    final_state: bool = True  # ask for (and backpropagate through) the final state


def _randn(*shape, dtype=BF16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def _log_decay(*shape, dtype=BF16):
    return F.logsigmoid(torch.randn(*shape, device="cuda")).to(dtype)


def make_qkv(b, t, n, gate_shape=None, gate_dtype=BF16):
    leaves = {
        "q": _randn(b, t, H, K),
        "k": _randn(b, t, H, K),
        "v": _randn(b, t, H, V),
        "initial_state": _randn(n, H, K, V, dtype=torch.float32),
    }
    if gate_shape is not None:
        leaves["g"] = _log_decay(b, t, H, *gate_shape, dtype=gate_dtype)
    return leaves


def kw_simple_gla(x, recurrent):
    return dict(x)


def kw_simple_gla_gamma(x, recurrent):
    # RetNet's fixed per-head decays 1 - 2^(-5 - h); fla gives g_gamma no gradient, so it is no leaf here
    gamma = torch.log1p(-(2.0 ** (-5.0 - torch.arange(H, device="cuda", dtype=torch.float32))))
    return {**x, "g_gamma": gamma}


def kw_gla(x, recurrent):
    return {("gk" if recurrent and n == "g" else n): t for n, t in x.items()}  # fla: chunk takes g, recurrent gk


def make_rwkv6(b, t, n):
    x = make_qkv(b, t, n)
    return {
        "r": x.pop("q"),
        **x,
        "w": -torch.exp(torch.randn(b, t, H, K, device="cuda") * 0.5 - 0.5).to(BF16),
        "u": 0.5 * _randn(H, K),
    }


def kw_rwkv6(x, recurrent):
    return {**x, "scale": 1.0}  # as the RWKV-6 mixer calls it


def make_linear_attn(b, t, n):
    x = make_qkv(b, t, n)
    x["q"], x["k"] = F.elu(x["q"].float()).add(1).to(BF16), F.elu(x["k"].float()).add(1).to(BF16)  # positive maps
    x["initial_z"] = torch.rand(n, 1, H, K, device="cuda")
    return x


def kw_linear_attn(x, recurrent):
    x = dict(x)
    return {**x, "initial_state": (x.pop("initial_state"), x.pop("initial_z")), "normalize": True}


def kw_linear_attn_raw(x, recurrent):
    return {**x, "normalize": False}


def make_hgrn(b, t, n):
    return {
        "x": _randn(b, t, H * K),
        "g": _log_decay(b, t, H * K),
        "initial_state": _randn(n, H * K, dtype=torch.float32),
    }


def kw_plain(x, recurrent):
    return dict(x)


CASES = {
    "simple_gla": Case(
        simple_gla.chunk_simple_gla,
        simple_gla.fused_recurrent_simple_gla,
        simple_gla.chunk_simple_gla_torch,
        lambda b, t, n: make_qkv(b, t, n, (), torch.float32),
        kw_simple_gla,
    ),  # fp32 g as Mamba2
    "simple_gla-g_gamma": Case(
        simple_gla.chunk_simple_gla,
        simple_gla.fused_recurrent_simple_gla,
        simple_gla.chunk_simple_gla_torch,
        make_qkv,
        kw_simple_gla_gamma,
    ),
    "gla": Case(
        gla.chunk_gla, gla.fused_recurrent_gla, gla.chunk_gla_torch, lambda b, t, n: make_qkv(b, t, n, (K,)), kw_gla
    ),
    "rwkv6": Case(rwkv6.chunk_rwkv6, rwkv6.fused_recurrent_rwkv6, rwkv6.chunk_rwkv6_torch, make_rwkv6, kw_rwkv6),
    "linear_attn": Case(
        linear_attn.chunk_linear_attn,
        linear_attn.fused_recurrent_linear_attn,
        linear_attn.chunk_linear_attn_torch,
        make_linear_attn,
        kw_linear_attn,
    ),
    "linear_attn-raw": Case(
        linear_attn.chunk_linear_attn,
        linear_attn.fused_recurrent_linear_attn,
        linear_attn.chunk_linear_attn_torch,
        make_qkv,
        kw_linear_attn_raw,
    ),
    "hgrn": Case(hgrn.chunk_hgrn, hgrn.fused_recurrent_hgrn, hgrn.chunk_hgrn_torch, make_hgrn, kw_plain),
    # no state gradients needed: the only case that reaches fla's chunk_hgrn kernel itself (ops/hgrn.py)
    "hgrn-stateless": Case(
        hgrn.chunk_hgrn,
        hgrn.fused_recurrent_hgrn,
        hgrn.chunk_hgrn_torch,
        lambda b, t, n: {k: v for k, v in make_hgrn(b, t, n).items() if k != "initial_state"},
        kw_plain,
        final_state=False,
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def flat(state: Any) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def run(
    fn: Callable[..., Any],
    leaves: dict[str, torch.Tensor],
    kwargs: dict[str, Any],
    cu_seqlens,
    grads_out: list[torch.Tensor],
    final_state: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    o, s = fn(**kwargs, output_final_state=final_state, cu_seqlens=cu_seqlens)
    states = flat(s) if final_state else []
    loss = (o.float() * grads_out[0]).sum() + sum(
        (st.float() * d).sum() for st, d in zip(states, grads_out[1:], strict=True)
    )
    loss.backward()
    return o, states, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize(
    "packed", [False, True], ids=[f"B{B}-T{T}-H{H}-K{K}", f"cu_seqlens-{'-'.join(map(str, DOCS))}"]
)
@pytest.mark.parametrize("recurrent", [False, True], ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("case", list(CASES))
def test_fla_kernel_matches_torch_reference(case, recurrent, packed):
    c = CASES[case]
    torch.manual_seed(0)
    b, n = (1, len(DOCS)) if packed else (B, B)
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], device="cuda") if packed else None
    base = c.make(b, T, n)
    if not use_fla(next(iter(base.values()))):
        pytest.skip("fla is not installed (or LINEAR_MOE_KERNELS=torch)")

    fla_leaves = {name: t.detach().clone().requires_grad_() for name, t in base.items()}
    ref_leaves = {name: t.detach().float().requires_grad_() for name, t in base.items()}
    with torch.no_grad():
        o_probe, s_probe = c.reference(**c.kwargs(ref_leaves, False), output_final_state=c.final_state, cu_seqlens=cu)
    grads_out = [torch.randn_like(o_probe)] + [torch.randn_like(s) for s in (flat(s_probe) if c.final_state else [])]

    fn = c.recurrent if recurrent else c.chunk
    o, states, grads = run(fn, fla_leaves, c.kwargs(fla_leaves, recurrent), cu, grads_out, c.final_state)
    o_ref, states_ref, grads_ref = run(
        c.reference, ref_leaves, c.kwargs(ref_leaves, False), cu, grads_out, c.final_state
    )

    assert o.shape == o_ref.shape
    errors = {"o": rel_err(o, o_ref)}
    errors |= {f"state{i}": rel_err(s, r) for i, (s, r) in enumerate(zip(states, states_ref, strict=True))}
    bad = {k: e for k, e in errors.items() if not e < TOL_OUT}
    for name, g_ref in grads_ref.items():
        assert grads[name] is not None, f"fla gave no gradient for {name}"
        e = rel_err(grads[name], g_ref)
        if not e < TOL_GRAD or math.isnan(e):
            bad[f"d{name}"] = e
    assert not bad, f"{case}: relative errors over tolerance {bad} (all: {errors})"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
