"""Linear attention (arXiv:2006.16236) without decay: S_t = S_{t-1} + k_t v_t^T, o_t = scale * q_t^T S_t.

`normalize=True` divides by `scale * q_t . z_t + 1e-10` with the running key sum z_t = z_0 + sum_{s<=t} k_s,
exactly as fla. Defaults differ between fla's two ops and are kept: `chunk_linear_attn(normalize=True)`,
`fused_recurrent_linear_attn(normalize=False)`. With `normalize=True` the state is a tuple
`(S [N, H, K, V], z [N, 1, H, K])` (initial_state may be that tuple or just S); otherwise just S.
"""

from __future__ import annotations

from typing import Any

import torch

from linear_moe.ops import _chunk_common as cc
from linear_moe.ops import checks
from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch
from linear_moe.ops.simple_gla import CHUNK_SIZE

Tensor = torch.Tensor
State = Tensor | tuple[Tensor, Tensor]


def _split_state(initial_state: State | None) -> tuple[Tensor | None, Tensor | None]:
    """`initial_state` -> (S [N, H, K, V], z [N, 1, H, K] or None)."""
    return initial_state if isinstance(initial_state, tuple) else (initial_state, None)


def _check(name: str, a: Args) -> None:
    """Validate q/k/v and the state (S, or (S, z) with normalize=True)."""
    q, v = a["q"], a["v"]
    n = checks.check_qkv(name, q, a["k"], v, a["cu_seqlens"])
    if isinstance(a["initial_state"], tuple) and not a["normalize"]:
        raise ValueError(f"{name}: a (S, z) tuple initial_state needs normalize=True; pass S alone otherwise")
    s0, z0 = _split_state(a["initial_state"])
    checks.check_state(name, s0, n, q.shape[2], q.shape[3], v.shape[3])
    checks.expect_shape(name, "initial_state[1] (z)", z0, (n, 1, q.shape[2], q.shape[3]), "[N, 1, H, K]")


def _scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _normalize(
    o: Tensor, q: Tensor, k: Tensor, scale: float, z0: Tensor | None, reverse: bool, cu_seqlens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Divide `o` by `scale * q_t . z_t + 1e-10`; return it and the final key sum z `[N, 1, H, K]`."""

    def denominators(q_: Tensor, k_: Tensor) -> tuple[Tensor, Tensor]:
        k_ = k_.to(cc.acc_dtype(q_, k_, z0))
        z_BTHK = k_.flip(1).cumsum(1).flip(1) if reverse else k_.cumsum(1)
        if z0 is not None:
            z_BTHK = z_BTHK + z0.to(z_BTHK.dtype)
        denom_BTH1 = (q_.to(z_BTHK.dtype) * scale * z_BTHK).sum(-1, keepdim=True) + 1e-10
        # padding sits at the end of a document and has zero keys, so the last row is the document's sum
        return denom_BTH1, (z_BTHK[:, :1] if reverse else z_BTHK[:, -1:])

    denom, z = cc.packed(denominators, cu_seqlens, q, k)
    return o / denom, z


def _run(engine, q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, **opts):
    s0, z0 = _split_state(initial_state)
    scale = _scale(q, scale)
    o, s = cc.packed(lambda q_, k_, v_: engine(q_, k_, v_, None, scale, s0, **opts), cu_seqlens, q, k, v)
    return _finish(o, s, q, k, scale, z0, output_final_state, normalize, opts.get("reverse", False), cu_seqlens)


def _finish(
    o: Tensor,
    s: Tensor | None,
    q: Tensor,
    k: Tensor,
    scale: float,
    z0: Tensor | None,
    output_final_state: bool,
    normalize: bool,
    reverse: bool,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, State | None]:
    """Unnormalised (o, S) -> o in q's dtype (normalised in float32 when asked) and the state to return."""
    if normalize:
        o, z = _normalize(o, q, k, scale, z0, reverse, cu_seqlens)
        return o.to(q.dtype), ((s, z) if output_final_state else None)
    return o.to(q.dtype), (s if output_final_state else None)


def _fla_args(a: Args) -> Args:
    """fla's unnormalised kernel, then our float32 normaliser (`_fla_finish`). fla's own `normalize=True` keeps the
    running key sum and the denominators in the input dtype, which in bf16 drifts by percents over a few hundred
    tokens with Based's 153-wide feature map. The kernel itself also runs on float32 inputs when normalising: the
    gradient of a normalised output is the small difference of two large terms (the kernel's and the
    normaliser's), and the kernel's bf16-rounded share of it loses most of its digits."""
    qkv = {n: a[n].float() if a["normalize"] else a[n] for n in ("q", "k", "v")}
    s0, _ = _split_state(a["initial_state"])
    return {**a, **qkv, "scale": _scale(a["q"], a["scale"]), "initial_state": s0, "normalize": False}


def _fla_finish(out: tuple[Tensor, Tensor | None], a: Args) -> tuple[Tensor, State | None]:
    o, s = out
    _, z0 = _split_state(a["initial_state"])
    reverse = a.get("reverse", False)
    scale = _scale(a["q"], a["scale"])
    return _finish(o, s, a["q"], a["k"], scale, z0, a["output_final_state"], a["normalize"], reverse, a["cu_seqlens"])


@checked(_check)
def chunk_linear_attn_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, State | None]:
    """PyTorch chunked form. q, k `[B, T, H, K]`, v `[B, T, H, V]` -> o `[B, T, H, V]`, final state (see module)."""
    return _run(
        cc.chunk_gated,
        q,
        k,
        v,
        scale,
        initial_state,
        output_final_state,
        normalize,
        cu_seqlens,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


@checked(_check)
def fused_recurrent_linear_attn_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    normalize: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, State | None]:
    """PyTorch token loop (decoding path); same shapes as `chunk_linear_attn_torch`."""
    return _run(
        cc.recurrent_gated,
        q,
        k,
        v,
        scale,
        initial_state,
        output_final_state,
        normalize,
        cu_seqlens,
        reverse=reverse,
    )


def _fla_call(name: str, *args: str) -> FlaCall:
    """fla's unnormalised `name` on (q, k, v, `args`), normalised by us in float32 (`_fla_args`, `_fla_finish`)."""
    return FlaCall("ops.linear_attn", name, ("q", "k", "v", *args), 3, adapt=_fla_args, finish=_fla_finish)


NOTE = "Extra kwargs are dropped (fla takes none); normalisation runs in float32 (`_fla_args`)."
STATE = ("scale", "initial_state", "output_final_state")
chunk_linear_attn = fla_dispatch(
    chunk_linear_attn_torch, _fla_call("chunk_linear_attn", *STATE, "normalize", "cu_seqlens"), note=NOTE
)
fused_recurrent_linear_attn = fla_dispatch(
    fused_recurrent_linear_attn_torch,
    _fla_call("fused_recurrent_linear_attn", *STATE, "reverse", "normalize", "cu_seqlens"),
    note=NOTE,
)
