"""The dispatch table of the public ops (`linear_moe.ops._dispatch`) on CPU.

Every public op is in the table, resolves to its module and its PyTorch fallback, and runs that fallback on CPU.
With a fake fla injected into `sys.modules` (and `use_fla` forced on), each op calls the fla function its table
entry names, with exactly the arguments the entry promises (positional ones first, the rest by keyword, the
caller's values or the signature's defaults), and the fake -- our PyTorch op with fla's signature -- returns the
same result as the PyTorch path. Whether those calls fit fla's *real* signatures is checked on the GPU machine
(`tests/gpu/test_ops_dispatch_gpu.py`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import _dispatch
from linear_moe.ops.activations import swiglu_torch
from linear_moe.ops.conv import causal_conv1d_torch
from linear_moe.ops.norm import rms_norm_gated_torch

B, T, H, K, V = 2, 10, 2, 4, 3
F64 = torch.float64


def rnd(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


def decay(*shape: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return -torch.rand(*shape, dtype=dtype)


def qkv(b: int = B, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    return {"q": rnd(b, T, H, K, dtype=dtype), "k": rnd(b, T, H, K, dtype=dtype), "v": rnd(b, T, H, V, dtype=dtype)}


def state(n: int = B, dtype: torch.dtype = F64) -> torch.Tensor:
    return rnd(n, H, K, V, dtype=dtype)


def rwkv7_inputs() -> dict[str, Any]:
    kk = F.normalize(rnd(B, T, H, K), dim=-1)
    rkv = dict(r=rnd(B, T, H, K), w=-0.5 * torch.rand(B, T, H, K, dtype=F64), k=rnd(B, T, H, K), v=rnd(B, T, H, V))
    return rkv | dict(a=-kk, b=kk * torch.rand(B, T, H, K, dtype=F64), initial_state=state(), output_final_state=True)


def delta_inputs(dtype: torch.dtype = F64) -> dict[str, Any]:
    x = qkv(dtype=dtype)
    x["k"] = F.normalize(x["k"], dim=-1)
    return x | dict(beta=torch.rand(B, T, H, dtype=dtype), initial_state=state(), output_final_state=True)


@dataclass
class Case:
    """One call of a public op: its inputs, the fla function it must reach (None: the PyTorch path even with fla),
    values fla must receive where the table adapts them, and whether inputs require gradients."""

    op: str
    make: Callable[[], dict[str, Any]]
    fla: str | None
    expect: dict[str, Any] = field(default_factory=dict)
    grad: bool = False


CU = torch.tensor([0, 4, 10])
CASES = [
    Case(
        "chunk_simple_gla",
        lambda: qkv() | dict(g=decay(B, T, H), g_gamma=decay(H), initial_state=state(), chunk_size=4),
        "chunk_simple_gla",
    ),
    Case(
        "fused_recurrent_simple_gla",
        lambda: qkv(1) | dict(g=decay(1, T, H), initial_state=state(), cu_seqlens=CU, reverse=False),
        "fused_recurrent_simple_gla",
    ),
    Case(  # fla gets the state in float32: make it exact in float32
        "chunk_gla",
        lambda: qkv() | dict(g=decay(B, T, H, K), initial_state=state(dtype=torch.float32).double(), chunk_size=4),
        "chunk_gla",
        expect=dict(initial_state=lambda t: t.dtype == torch.float32),  # fla asserts a float32 state
    ),
    Case(
        "chunk_gla",
        lambda: (
            qkv(1)
            | dict(g=decay(1, T, H, K), initial_state=state(2).float().transpose(-1, -2), cu_seqlens=CU)
            | dict(state_v_first=True)
        ),
        "chunk_gla",
    ),
    Case(
        "fused_recurrent_gla",
        lambda: qkv() | dict(gk=decay(B, T, H, K), gv=decay(B, T, H, V), initial_state=state()),
        "fused_recurrent_gla",
    ),
    Case(
        "chunk_linear_attn",
        lambda: (
            {n: t.sigmoid() for n, t in qkv(dtype=torch.float32).items()}
            | dict(initial_state=(state(dtype=torch.float32), torch.rand(B, 1, H, K)))
        ),
        "chunk_linear_attn",
        expect=dict(normalize=False, scale=K**-0.5),
    ),
    Case(
        "fused_recurrent_linear_attn",
        lambda: qkv() | dict(initial_state=state(), scale=0.3),
        "fused_recurrent_linear_attn",
    ),
    Case("chunk_hgrn", lambda: dict(x=rnd(B, T, H * K), g=decay(B, T, H * K)), "chunk_hgrn"),
    Case(
        "chunk_hgrn",
        lambda: dict(x=rnd(1, T, H * K), g=decay(1, T, H * K), initial_state=rnd(2, H * K), cu_seqlens=CU),
        "fused_recurrent_hgrn",
    ),
    Case(
        "fused_recurrent_hgrn",
        lambda: dict(x=rnd(B, T, H * K), g=decay(B, T, H * K), initial_state=rnd(B, H * K)),
        "fused_recurrent_hgrn",
    ),
    Case(
        "chunk_rwkv6",
        lambda: dict(r=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V), w=decay(B, T, H, K), u=rnd(H, K)),
        "chunk_rwkv6",
    ),
    Case(
        "fused_recurrent_rwkv6",
        lambda: dict(r=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V), w=decay(B, T, H, K), u=rnd(H, K)),
        "fused_recurrent_rwkv6",
    ),
    Case(
        "fused_recurrent_rwkv6",
        lambda: dict(r=rnd(B, T, H, K), k=rnd(B, T, H, K), v=rnd(B, T, H, V), w=decay(B, T, H, K), u=rnd(H, K)),
        "chunk_rwkv6",
        grad=True,
    ),
    Case("chunk_delta_rule", lambda: delta_inputs() | dict(chunk_size=4), "chunk_delta_rule"),
    Case("chunk_delta_rule", lambda: delta_inputs(torch.float32), None),  # fla's kernel rejects float32
    Case("fused_recurrent_delta_rule", delta_inputs, "fused_recurrent_delta_rule"),
    Case(
        "chunk_gated_delta_rule",
        lambda: delta_inputs() | dict(g=decay(B, T, H), use_qk_l2norm_in_kernel=True),
        "chunk_gated_delta_rule",
    ),
    Case(
        "fused_recurrent_gated_delta_rule",
        lambda: delta_inputs() | dict(gk=decay(B, T, H, K)),
        "fused_recurrent_gated_delta_rule",
    ),
    Case("chunk_rwkv7", lambda: rwkv7_inputs() | dict(chunk_size=4, not_an_fla_option=1), "chunk_rwkv7"),
    Case(  # fla needs r, k, a, b in v's dtype
        "fused_recurrent_rwkv7",
        lambda: rwkv7_inputs() | dict(r=rnd(B, T, H, K, dtype=torch.float32)),
        "fused_recurrent_rwkv7",
        expect=dict(r=lambda t: t.dtype == F64),
    ),
    Case(
        "causal_conv1d",
        lambda: dict(x=rnd(1, T, 6), weight=rnd(6, 4), activation="silu", cu_seqlens=CU),
        "causal_conv1d",
    ),
    Case(
        "rms_norm_gated",
        lambda: dict(x=rnd(B, T, 6, dtype=torch.float32), g=rnd(B, T, 6), weight=rnd(6)),
        "rms_norm_gated",
        expect=dict(bias=None),
    ),
    Case("rms_norm_gated", lambda: dict(x=rnd(B, T, 6), g=rnd(B, T, 6), weight=None), None),
    Case("swiglu", lambda: dict(gate=rnd(B, 6), up=rnd(B, 6)), "swiglu"),
    Case("swiglu", lambda: dict(gate=rnd(B, 6), up=rnd(B, 6, dtype=torch.float32)), None),
    # fla's token shift is taken only with fla's cp_context (tests/test_parallel_cp_fla.py)
    Case("token_shift", lambda: dict(x=rnd(1, T, 6), state=rnd(2, 6), cu_seqlens=CU), None),
]
CASE_IDS = [f"{c.op}-{c.fla or 'torch'}{'-grad' if c.grad else ''}" for c in CASES]

TWINS: dict[str, Callable[..., Any]] = {  # fla's module functions as our PyTorch code, with fla's signatures
    "causal_conv1d": lambda x, weight, bias=None, activation=None, cu_seqlens=None: (
        causal_conv1d_torch(x, weight, bias, activation, cu_seqlens),
        None,
    ),
    "rms_norm_gated": lambda x, g, weight, bias, activation="swish", eps=1e-6: rms_norm_gated_torch(
        x, g, weight, eps, activation
    ),
    "swiglu": swiglu_torch,
}


def twin(op: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Our PyTorch function computing what fla's `name` computes (`<name>_torch` beside the op)."""
    return TWINS.get(name) or getattr(importlib.import_module(op.__module__), f"{name}_torch")


def fake_fla(monkeypatch: pytest.MonkeyPatch, op: Callable[..., Any], calls: list) -> None:
    """Put a fake `fla.<module>` for each of `op`'s fla calls into sys.modules; each function records its
    (name, positional, keyword) arguments and runs the PyTorch twin on them."""

    def recorder(name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return twin(op, name)(*args, **{k: v for k, v in kwargs.items() if k != "cu_seqlens_cpu"})

        return run

    modules: dict[str, types.ModuleType] = {}
    for call in op.calls:
        module = modules.setdefault(call.module, types.ModuleType(f"fla.{call.module}"))
        setattr(module, call.name, recorder(call.name))
    for path, module in modules.items():
        monkeypatch.setitem(sys.modules, f"fla.{path}", module)
    monkeypatch.setattr(_dispatch, "use_fla", lambda x: True)


def same(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want.to(got.dtype))
    return got == want


def outputs(result: Any) -> list[torch.Tensor]:
    flat = list(result) if isinstance(result, tuple) else [result]
    return [t for x in flat for t in (x if isinstance(x, tuple) else (x,)) if t is not None]


def test_every_public_op_resolves_to_its_module_and_torch_fallback():
    table = _dispatch.dispatch_table()
    for module_name in _dispatch.OP_MODULES:  # every `<op>_torch` in an op module has its public op in the table
        module = importlib.import_module(f"linear_moe.ops.{module_name}")
        for attr in dir(module):
            if attr.endswith("_torch") and callable(getattr(module, attr)):
                assert attr.removesuffix("_torch") in table, f"{module_name}.{attr} has no public op in the table"
    for name, op in table.items():
        module = importlib.import_module(op.__module__)
        assert getattr(module, name) is op
        assert getattr(module, f"{name}_torch") is op.torch
        assert inspect.signature(op) == inspect.signature(op.torch)
        assert op.calls and all(c.module.split(".")[0] in ("ops", "modules") for c in op.calls)
    assert {c.op for c in CASES} == set(table), "every op has a case below"
    reached = {(c.op, c.fla) for c in CASES}
    calls = {(n, c.name) for n, op in table.items() for c in op.calls if not c.cp_only}  # cp_only: test_parallel_cp_fla
    assert calls <= reached, "every fla call is exercised"


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_fallback_runs_on_cpu(case):
    torch.manual_seed(0)
    op, inputs = _dispatch.OPS[case.op], case.make()
    for got, want in zip(outputs(op(**inputs)), outputs(op.torch(**inputs)), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fla_branch_gets_exactly_the_promised_arguments(monkeypatch, case):
    torch.manual_seed(0)
    op = _dispatch.dispatch_table()[case.op]
    inputs = case.make()
    if case.grad:
        inputs = {n: t.requires_grad_() if isinstance(t, torch.Tensor) else t for n, t in inputs.items()}
    want = op.torch(**inputs)
    calls: list = []
    fake_fla(monkeypatch, op, calls)
    got = op(**inputs)
    if case.fla is None:
        assert calls == []
    else:
        assert [c[0] for c in calls] == [case.fla]
        _, positional, keywords = calls[0]
        call = next(c for c in op.calls if c.name == case.fla)
        sig = inspect.signature(op)
        extra = {n: v for n, v in inputs.items() if n not in sig.parameters}
        forwarded = {n for n in extra if call.kwargs is True or (call.kwargs and n in call.kwargs)}
        assert len(positional) == call.positional
        assert set(keywords) == set(call.args[call.positional :]) | forwarded
        received = dict(zip(call.args[: call.positional], positional, strict=True)) | keywords
        for n in call.args:
            default = sig.parameters[n].default if n in sig.parameters else None
            expected = case.expect.get(n, inputs.get(n, default))
            if n == "initial_state" and isinstance(expected, tuple):  # (S, z): fla gets S, we normalise with z
                expected = expected[0]
            if callable(expected) and not isinstance(expected, torch.Tensor):
                assert expected(received[n]), f"{case.op} passed {n} = {received[n]!r} to fla's {case.fla}"
            else:
                assert same(received[n], expected), f"{case.op} passed {n} = {received[n]!r} to fla's {case.fla}"
        assert all(received[n] is extra[n] for n in forwarded)
        # nothing the caller said is lost: every named argument reaches fla, or is one fla lacks and holds its default
        named = {n for n, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD}
        assert named <= set(call.args) | set(call.drops)
        assert all(same(inputs.get(n, sig.parameters[n].default), sig.parameters[n].default) for n in call.drops)
        # and fla's names are those of our PyTorch twin, which mirrors fla's signature (extras only where forwarded)
        twin_params = inspect.signature(twin(op, case.fla)).parameters
        assert set(keywords) - forwarded <= set(twin_params), f"{case.fla} takes no {set(keywords) - set(twin_params)}"
    for g, w in zip(outputs(got), outputs(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_kernels_torch_forces_the_pytorch_path(monkeypatch):
    monkeypatch.setattr(_dispatch, "fla_available", lambda: True)
    cuda_tensor = SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("LINEAR_MOE_KERNELS", "auto")
    assert _dispatch.use_fla(cuda_tensor)
    assert not _dispatch.use_fla(torch.zeros(1))  # CPU tensors always take the PyTorch path
    monkeypatch.setenv("LINEAR_MOE_KERNELS", "torch")
    assert not _dispatch.use_fla(cuda_tensor)


def test_checks_run_before_fla(monkeypatch):
    """A bad shape raises our one-line error on the fla path too, before fla is called."""
    op = _dispatch.dispatch_table()["chunk_gla"]
    calls: list = []
    fake_fla(monkeypatch, op, calls)
    x = qkv()
    with pytest.raises(ValueError, match="`g` must have shape"):
        op(**x, g=decay(B, T, H))
    assert calls == []
