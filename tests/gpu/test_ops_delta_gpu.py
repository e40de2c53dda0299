"""fla's Triton kernels for the delta-rule family (reached through our public `chunk_*` / `fused_recurrent_*` on
CUDA) against our PyTorch chunked WY form `chunk_*_torch` on the same CUDA inputs: outputs, final states and the
gradients of every input.

fla runs in bf16 (log decays in fp32 as the layers make them); the reference runs in fp32 from the same values.
Errors are relative (||a - b|| / ||b||). fla's fused_recurrent kernels of gated_delta_rule and rwkv7 have no
backward pass (inference only), so only their forward is compared.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import delta_rule, gated_delta_rule, rwkv7
from linear_moe.ops._dispatch import use_fla

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

B, T, H, K, V = 2, 300, 4, 64, 64  # T is not a multiple of the chunk sizes
DOCS = [37, 113, 150]  # packed case: batch 1, T = 300
TOL_OUT, TOL_GRAD = 1e-2, 2e-2  # bf16 kernel vs fp32 reference; gate gradients are the noisiest
BF16 = torch.bfloat16
FAMILIES = ["delta_rule", "gated_delta_rule", "rwkv7"]
MODULES = {"delta_rule": delta_rule, "gated_delta_rule": gated_delta_rule, "rwkv7": rwkv7}
NO_FLA_BACKWARD = {"fused_recurrent_gated_delta_rule", "fused_recurrent_rwkv7"}


def make_leaves(
    family: str, b: int, t: int, n: int, l2norm_in_kernel: bool = False, gva: int = 1
) -> dict[str, torch.Tensor]:
    """Inputs as real layers make them: l2-normalised keys, beta in (0, 1), log decays <= 0, fp32 state.
    gva: value heads per q/k head (gated_delta_rule only)."""

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda")

    HV = H * gva
    h0 = rnd(n, HV, K, V) * 0.1
    if family == "rwkv7":
        kk = F.normalize(rnd(b, t, H, K), dim=-1)
        x = dict(
            r=rnd(b, t, H, K),
            w=-0.6065 * rnd(b, t, H, K).sigmoid(),
            k=rnd(b, t, H, K) * K**-0.5,
            v=rnd(b, t, H, V),
            a=-kk,
            b=kk * rnd(b, t, H, K).sigmoid(),
        )
    else:
        q, k = rnd(b, t, H, K), rnd(b, t, H, K)
        if not l2norm_in_kernel:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        x = dict(q=q, k=k, v=rnd(b, t, HV, V))
        if family == "gated_delta_rule":
            x["g"] = F.logsigmoid(rnd(b, t, HV) + 2.0) * 2.0  # fp32, mostly in [-1, 0], some strong
        x["beta"] = rnd(b, t, HV).sigmoid()
    leaves = {n_: (v_ if n_ == "g" else v_.to(BF16)) for n_, v_ in x.items()}
    leaves["initial_state"] = h0
    return {n_: v_.detach().requires_grad_() for n_, v_ in leaves.items()}


def run(fn: Callable[..., Any], family: str, x: dict[str, torch.Tensor], **kw: Any) -> tuple[torch.Tensor, Any]:
    args = dict(x)
    h0 = args.pop("initial_state")
    if family == "rwkv7":
        kw.setdefault("scale", 1.0)  # fla's chunk and fused_recurrent rwkv7 default differently
        return fn(
            args["r"],
            args["w"],
            args["k"],
            args["v"],
            args["a"],
            args["b"],
            initial_state=h0,
            output_final_state=True,
            **kw,
        )
    if family == "gated_delta_rule":
        return fn(
            args["q"],
            args["k"],
            args["v"],
            g=args["g"],
            beta=args["beta"],
            initial_state=h0,
            output_final_state=True,
            **kw,
        )
    return fn(args["q"], args["k"], args["v"], args["beta"], initial_state=h0, output_final_state=True, **kw)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def compare(family: str, kind: str, b: int, cu_seqlens: torch.Tensor | None = None, gva: int = 1, **kw: Any) -> None:
    mod = MODULES[family]
    name = f"{kind}_{family}"
    n = b if cu_seqlens is None else len(cu_seqlens) - 1
    torch.manual_seed(0)
    x = make_leaves(family, b, T, n, kw.get("use_qk_l2norm_in_kernel", False), gva)
    x_ref = {k_: v_.detach().float().requires_grad_() for k_, v_ in x.items()}
    o, s = run(getattr(mod, name), family, x, cu_seqlens=cu_seqlens, **kw)
    o_ref, s_ref = run(getattr(mod, f"chunk_{family}_torch"), family, x_ref, cu_seqlens=cu_seqlens, **kw)
    assert o.dtype == BF16 and o.shape == o_ref.shape and s.shape == s_ref.shape
    assert rel_err(o, o_ref) < TOL_OUT, f"{name} output: {rel_err(o, o_ref):.2e}"
    assert rel_err(s, s_ref) < TOL_OUT, f"{name} final state: {rel_err(s, s_ref):.2e}"
    if name in NO_FLA_BACKWARD:
        return
    do, ds = torch.randn_like(o_ref), torch.randn_like(s_ref)
    ((o.float() * do).sum() + (s.float() * ds).sum()).backward()
    ((o_ref * do).sum() + (s_ref * ds).sum()).backward()
    for arg in x:
        err = rel_err(x[arg].grad, x_ref[arg].grad)
        assert err < TOL_GRAD, f"{name} d{arg}: relative error {err:.2e}"


def test_fla_is_used() -> None:
    assert use_fla(torch.zeros(1, device="cuda")), "fla (and triton) must be importable for these tests"


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fla_matches_torch(family: str, kind: str) -> None:
    compare(family, kind, B)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", FAMILIES)
def test_fla_matches_torch_packed(family: str, kind: str) -> None:
    cu = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()], device="cuda", dtype=torch.long)
    compare(family, kind, 1, cu_seqlens=cu)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("family", ["delta_rule", "gated_delta_rule"])
def test_fla_matches_torch_qk_l2norm_in_kernel(family: str, kind: str) -> None:
    compare(family, kind, B, use_qk_l2norm_in_kernel=True)


@pytest.mark.parametrize("kind", ["chunk", "fused_recurrent"])
def test_fla_matches_torch_grouped_value_heads(kind: str) -> None:
    compare("gated_delta_rule", kind, B, gva=2)
