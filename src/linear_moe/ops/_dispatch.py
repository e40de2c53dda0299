"""One dispatch for every public op: fla's Triton kernel on CUDA, our PyTorch implementation elsewhere.

A public op is built from its PyTorch implementation and the ways it may call fla:

    chunk_gla = fla_dispatch(chunk_gla_torch, FlaCall("ops.gla", "chunk_gla", ("q", "k", "v", "g", ...), ...))

`fla_dispatch` gives the op the PyTorch function's signature (fla's own) and registers it in `OPS`. On a call it
runs the PyTorch function unless `use_fla(first argument)`; then it binds the arguments, runs the op's check and
takes the first `FlaCall` whose `when` holds (none holding: PyTorch again). A `FlaCall` states exactly what fla
receives: the argument names (the first `positional` of them by position, the rest by keyword, under the same
name in fla), optionally the caller's extra keyword arguments, an `adapt` that casts arguments before the call
and a `finish` that post-processes fla's result. Tests check these promises against fla's real signatures.

fla's context parallelism: a caller may pass `cp_context=` (fla.ops.cp's `FLACPContext`) to any public op. It is
never bound to the PyTorch signature: the op hands it to the first `FlaCall` with `cp=True` whose `when` holds, on
CUDA with fla; anywhere else (CPU, `LINEAR_MOE_KERNELS=torch`, an op or arguments fla's context parallelism does
not cover) it raises a one-line ValueError, since the PyTorch path would silently ignore the other ranks.

fla is optional and imported lazily: importing `linear_moe` never imports triton or fla.
Set `LINEAR_MOE_KERNELS=torch` to force the PyTorch path everywhere (useful to compare).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Args = dict[str, Any]  # an op's bound arguments by name; the op's extra keyword arguments under "kwargs"
OPS: dict[str, Callable[..., Any]] = {}  # public op name -> op (filled as the op modules are imported)
OP_MODULES = (
    "simple_gla",
    "linear_attn",
    "gla",
    "hgrn",
    "rwkv6",
    "delta_rule",
    "gated_delta_rule",
    "rwkv7",
    "conv",
    "token_shift",
    "norm",
    "activations",
)


@functools.cache
def fla_available() -> bool:
    """True when fla (flash-linear-attention) and triton import cleanly."""
    try:
        importlib.import_module("fla.ops")
    except Exception:  # noqa: BLE001 - any import failure means "use the torch path"
        return False
    return True


def use_fla(x: torch.Tensor) -> bool:
    """Whether an op on `x` should run fla's kernel: CUDA tensor, fla installed, not disabled."""
    if os.environ.get("LINEAR_MOE_KERNELS", "auto") == "torch":
        return False
    return x.is_cuda and fla_available()


def like(ref: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast tensors to `ref`'s dtype: fla's kernels need q/k/v (and beta) in one dtype, which autocast
    breaks (an l2 norm under autocast returns float32 next to bf16 projections)."""
    return tuple(None if t is None else t.to(ref.dtype) for t in tensors)


def cast_like(ref: str, *names: str) -> Callable[[Args], Args]:
    """An `adapt` casting the arguments `names` to the dtype of argument `ref` (see `like`)."""

    def adapt(a: Args) -> Args:
        return {**a, **dict(zip(names, like(a[ref], *(a[n] for n in names)), strict=True))}

    return adapt


def needs_grad(a: Args, *names: str) -> bool:
    """Whether autograd is on and any of the tensor arguments `names` requires a gradient."""
    return torch.is_grad_enabled() and any(isinstance(a[n], torch.Tensor) and a[n].requires_grad for n in names)


@dataclass(frozen=True)
class FlaCall:
    """One way a public op calls fla: `fla.<module>.<name>(*positional, **keywords)`.

    args: our argument names passed on, in order, under the same names in fla; the first `positional` by position.
    kwargs: pass the caller's extra keyword arguments on: all of them (fla takes **kwargs), only these names, or
        none (False).
    when: take this call only when `when(args)` holds (dtype limits, gradients fla's kernel would drop).
    adapt: bound arguments -> the arguments fla gets (casts; constants fla needs that the op does not take).
    finish: (fla's result, bound arguments) -> the op's result.
    drops: the op's arguments fla does not take; `when` guarantees they hold their defaults.
    cp: fla's function takes `cp_context` (its context parallelism): a caller's `cp_context` is passed on.
    cp_only: taken only with a `cp_context` (fla's context-parallel form of an op that otherwise runs PyTorch).
    """

    module: str
    name: str
    args: tuple[str, ...]
    positional: int = 0
    kwargs: bool | tuple[str, ...] = False
    when: Callable[[Args], bool] | None = None
    adapt: Callable[[Args], Args] | None = None
    finish: Callable[[Any, Args], Any] | None = None
    drops: tuple[str, ...] = ()
    cp: bool = False
    cp_only: bool = False

    def fn(self) -> Callable[..., Any]:
        """fla's function (imported on first use)."""
        return getattr(importlib.import_module(f"fla.{self.module}"), self.name)

    def arguments(self, a: Args) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(positional, keyword) arguments fla receives for the op's bound arguments `a`."""
        a = self.adapt(a) if self.adapt is not None else a
        extra = a.get("kwargs") or {}
        if self.kwargs is False:
            extra = {}
        elif self.kwargs is not True:
            extra = {n: v for n, v in extra.items() if n in self.kwargs}
        keywords = {n: a[n] for n in self.args[self.positional :]}
        return tuple(a[n] for n in self.args[: self.positional]), {**keywords, **extra}

    def __call__(self, a: Args, cp_context: Any = None) -> Any:
        positional, keywords = self.arguments(a)
        if cp_context is not None:
            keywords["cp_context"] = cp_context
        out = self.fn()(*positional, **keywords)
        return out if self.finish is None else self.finish(out, a)


def bind(sig: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Args:
    """The bound arguments of a call by name, defaults filled, extra keywords under "kwargs"."""
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def checked(check: Callable[[str, Args], None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a PyTorch op implementation `<op>_torch` so that every call first runs `check(<op>, args)`.
    `fla_dispatch` runs the same check before calling fla."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig, name = inspect.signature(fn), fn.__name__.removesuffix("_torch")

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            check(name, bind(sig, args, kwargs))
            return fn(*args, **kwargs)

        run.check = check
        return run

    return wrap


def fla_dispatch(
    torch_fn: Callable[..., Any],
    *calls: FlaCall,
    check: Callable[[str, Args], None] | None = None,
    note: str = "",
) -> Callable[..., Any]:
    """The public op `<name>` for the PyTorch implementation `<name>_torch`: the first of `calls` whose `when`
    holds on CUDA with fla, `torch_fn` otherwise. `check` (default: `torch_fn`'s from `checked`) runs before fla."""
    sig = inspect.signature(torch_fn)
    name = torch_fn.__name__.removesuffix("_torch")
    check = check if check is not None else getattr(torch_fn, "check", None)

    def op(*args: Any, cp_context: Any = None, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs[next(iter(sig.parameters))]
        if cp_context is not None:
            return _cp_call(name, sig, calls, check, x, args, kwargs, cp_context)
        if use_fla(x):
            a = bind(sig, args, kwargs)
            for call in calls:
                if not call.cp_only and (call.when is None or call.when(a)):
                    if check is not None:
                        check(name, a)
                    return call(a)
        return torch_fn(*args, **kwargs)

    targets = " / ".join(f"`{c.name}`" for c in calls)
    op.__name__ = op.__qualname__ = name
    op.__module__ = torch_fn.__module__
    op.__signature__ = sig
    op.__doc__ = f"fla's {targets} on CUDA, else `{torch_fn.__name__}` (same arguments). {note}".strip()
    op.torch = torch_fn
    op.calls = calls
    op.check = check
    OPS[name] = op
    return op


def _cp_call(
    name: str,
    sig: inspect.Signature,
    calls: tuple[FlaCall, ...],
    check: Callable[[str, Args], None] | None,
    x: torch.Tensor,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    cp_context: Any,
) -> Any:
    """An op called with fla's `cp_context`: its first `cp` call whose `when` holds, or a one-line error."""
    fix = "use parallel.cp_backend=own (our state exchange)"
    if not any(c.cp for c in calls):
        raise ValueError(f"{name}: fla's context parallelism (cp_context) does not cover this op; {fix}")
    if not use_fla(x):
        where = "LINEAR_MOE_KERNELS=torch" if x.is_cuda and fla_available() else f"a {x.device.type} tensor"
        raise ValueError(
            f"{name}: cp_context (fla's context parallelism) runs only fla's CUDA kernel, got {where}; {fix}"
        )
    a = bind(sig, args, kwargs)
    for call in calls:
        if call.cp and (call.when is None or call.when(a)):
            if check is not None:
                check(name, a)
            return call(a, cp_context)
    raise ValueError(f"{name}: fla's context-parallel kernel does not take these arguments (a state?); {fix}")


def dispatch_table() -> dict[str, Callable[..., Any]]:
    """Every public op by name (importing all op modules)."""
    for module in OP_MODULES:
        importlib.import_module(f"linear_moe.ops.{module}")
    return dict(OPS)
