"""The dispatch table against fla's real functions (`inspect.signature`), where fla is installed.

For every public op and every fla function it may call (`FlaCall`): the arguments we pass by position are fla's
first parameters in that order, every keyword we pass is a named parameter of fla (none swallowed by a
`**kwargs`), the caller's extra keywords are forwarded only where fla takes `**kwargs` or names them, the
arguments we drop (`drops`) are ones fla lacks, and a call that hands on fla's `cp_context` (`cp`) goes to a
function with that parameter. Our public ops keep fla's defaults for every parameter they share
with the fla function of the same name. The CPU twin (`tests/test_ops_dispatch.py`) checks that each op passes
exactly what its table entry promises.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from linear_moe.ops._dispatch import FlaCall, dispatch_table

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True, scope="module")
def _needs_fla():
    """Inside a fixture, not at import: collecting this file on a CPU run (where `gpu` tests are deselected)
    must not report a skip."""
    pytest.importorskip("fla.ops", reason="needs fla (flash-linear-attention)")


TABLE = dispatch_table()
CALLS = [(name, call) for name, op in TABLE.items() for call in op.calls]
NAMED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def fla_signature(fn) -> tuple[inspect.Signature, bool]:
    """fla's signature of `fn`, and whether its parameter names are meaningful. An autograd `Function.apply`
    exported as the op (fla's `swiglu = SwiGLUFunction.apply`) shows `(*args, **kwargs)`: read its `forward`
    without `ctx` instead; its positional names are fla's internal ones (x, y), so only their number binds."""
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        sig = inspect.signature(owner.forward)
        return sig.replace(parameters=list(sig.parameters.values())[1:]), False
    return inspect.signature(fn), True


@pytest.mark.parametrize(("op", "call"), CALLS, ids=[f"{n}->{c.name}" for n, c in CALLS])
def test_our_call_binds_to_fla_signature(op: str, call: FlaCall) -> None:
    sig, named_positionals = fla_signature(call.fn())
    params = list(sig.parameters.values())
    if named_positionals:
        assert [p.name for p in params[: call.positional]] == list(call.args[: call.positional]), (
            f"{op}: positional arguments {call.args[: call.positional]} are not fla's first parameters"
        )
    else:
        assert len([p for p in params if p.kind in NAMED]) >= call.positional, f"{op}: fla takes fewer arguments"
    named = {p.name for p in params if p.kind in NAMED}
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
    keywords = set(call.args[call.positional :])
    assert keywords <= named, f"{op}: fla's {call.name} has no parameter {keywords - named}"
    if call.kwargs is True:
        assert takes_kwargs, f"{op}: fla's {call.name} takes no **kwargs to forward extras to"
    elif call.kwargs:
        assert set(call.kwargs) <= named, f"{op}: fla's {call.name} has no parameter {set(call.kwargs) - named}"
    assert not set(call.drops) & named, f"{op}: fla's {call.name} takes {set(call.drops) & named}: forward it"
    assert not call.cp or "cp_context" in named, f"{op}: fla's {call.name} takes no cp_context"
    sig.bind(*([None] * call.positional), **dict.fromkeys(keywords | ({"cp_context"} if call.cp else set())))


@pytest.mark.parametrize("op", [n for n, op in TABLE.items() if any(c.name == n for c in op.calls)])
def test_public_op_keeps_fla_defaults(op: str) -> None:
    ours = inspect.signature(TABLE[op]).parameters
    theirs = fla_signature(next(c for c in TABLE[op].calls if c.name == op).fn())[0].parameters
    for name, p in ours.items():
        q = theirs.get(name)
        if q is None or p.default is p.empty or q.default is q.empty:
            continue
        assert p.default == q.default, f"{op}({name}=...): ours defaults to {p.default!r}, fla's to {q.default!r}"
