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
from linear_moe.ops._dispatch import fla_op, use_fla
from linear_moe.ops.simple_gla import CHUNK_SIZE

Tensor = torch.Tensor
State = Tensor | tuple[Tensor, Tensor]


def _split_state(
    name: str, q: Tensor, k: Tensor, v: Tensor, initial_state: State | None, normalize: bool, cu_seqlens: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Validate inputs and split `initial_state` into (S [N, H, K, V], z [N, 1, H, K])."""
    n = cc.check_qkv(name, q, k, v, cu_seqlens)
    if isinstance(initial_state, tuple):
        if not normalize:
            raise ValueError(f"{name}: a (S, z) tuple initial_state needs normalize=True; pass S alone otherwise")
        s0, z0 = initial_state
    else:
        s0, z0 = initial_state, None
    cc.check_state(name, s0, n, q.shape[2], q.shape[3], v.shape[3])
    cc.expect_shape(name, "initial_state[1] (z)", z0, (n, 1, q.shape[2], q.shape[3]), "[N, 1, H, K]")
    return s0, z0


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


def _run(engine, q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, name, **opts):
    s0, z0 = _split_state(name, q, k, v, initial_state, normalize, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


def _run_fla(
    name: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None,
    initial_state: State | None,
    output_final_state: bool,
    normalize: bool,
    cu_seqlens: Tensor | None,
    **opts: Any,
) -> tuple[Tensor, State | None]:
    """fla's unnormalised kernel, then our float32 normaliser. fla's own `normalize=True` keeps the running key
    sum and the denominators in the input dtype, which in bf16 drifts by percents over a few hundred tokens with
    Based's 153-wide feature map. The kernel itself also runs on float32 inputs when normalising: the gradient of
    a normalised output is the small difference of two large terms (the kernel's and the normaliser's), and the
    kernel's bf16-rounded share of it loses most of its digits."""
    s0, z0 = _split_state(name, q, k, v, initial_state, normalize, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qkv = (q.float(), k.float(), v.float()) if normalize else (q, k, v)
    o, s = fla_op("linear_attn", name)(
        *qkv,
        scale=scale,
        initial_state=s0,
        output_final_state=output_final_state,
        normalize=False,
        cu_seqlens=cu_seqlens,
        **opts,
    )
    return _finish(o, s, q, k, scale, z0, output_final_state, normalize, opts.get("reverse", False), cu_seqlens)


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
    cc.reject_head_first("chunk_linear_attn", kwargs)
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
        "chunk_linear_attn",
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


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
    cc.reject_head_first("fused_recurrent_linear_attn", kwargs)
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
        "fused_recurrent_linear_attn",
        reverse=reverse,
    )


def chunk_linear_attn(
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
    """fla's `chunk_linear_attn` on CUDA (extra kwargs dropped), else `chunk_linear_attn_torch`."""
    cc.reject_head_first("chunk_linear_attn", kwargs)
    if use_fla(q):
        return _run_fla("chunk_linear_attn", q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)
    return chunk_linear_attn_torch(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens, **kwargs)


def fused_recurrent_linear_attn(
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
    """fla's `fused_recurrent_linear_attn` on CUDA (extra kwargs dropped), else the token loop."""
    cc.reject_head_first("fused_recurrent_linear_attn", kwargs)
    if use_fla(q):
        return _run_fla(
            "fused_recurrent_linear_attn",
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
    return fused_recurrent_linear_attn_torch(
        q, k, v, scale, initial_state, output_final_state, reverse, normalize, cu_seqlens, **kwargs
    )
