"""Gated DeltaNet (arXiv:2412.06464): S_t = (I - beta_t k_t k_t^T) exp(g_t) S_{t-1} + beta_t k_t v_t^T,
o_t = scale * q_t^T S_t, state `S [K, V]` per head, `g [B, T, H]` the per-token log decay (<= 0, not cumsum'd).

Signatures follow fla 0.6.0 (`fla.ops.gated_delta_rule`), including its in-kernel options:
`use_qk_l2norm_in_kernel` (l2-normalise q, k), `use_beta_sigmoid_in_kernel` (beta = sigmoid(beta), times 2 with
`allow_neg_eigval`), `use_gate_in_kernel` (g = -exp(A_log) * softplus(g + dt_bias)), `state_v_first` (state
stored `[V, K]`). `fused_recurrent_gated_delta_rule` also takes a per-key-channel decay `gk [B, T, H, K]`.
Grouped value heads (GVA): v, g, beta and the state may have HV = m * H heads; value head i uses q/k head i // m.
The PyTorch path does not implement the value-side decay `gv`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from linear_moe.ops import _wy, checks
from linear_moe.ops._dispatch import Args, FlaCall, cast_like, checked, fla_dispatch
from linear_moe.ops.delta_rule import delta_to_dplr

Tensor = torch.Tensor
CHUNK_SIZE = 64


def expand_gva(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Repeat q, k `[B, T, H, K]` to v's HV heads (value head i reads q/k head i // (HV // H))."""
    h, hv = q.shape[2], v.shape[2]
    return (q, k) if hv == h else (q.repeat_interleave(hv // h, dim=2), k.repeat_interleave(hv // h, dim=2))


def _check_layout(name: str, a: Args) -> None:
    """`[B, T, H, D]` q, k and v (v may have more heads than q: GVA) and packing; all fla's kernel needs from us."""
    checks.check_layout(name, q=a["q"], k=a["k"])
    checks.check_layout(name, v=a["v"])
    checks.check_varlen(name, a["q"], a["cu_seqlens"])


def _check(name: str, a: Args) -> None:
    """Full checks of the PyTorch path, value heads HV a multiple of the q/k heads H (GVA)."""
    _check_layout(name, a)
    q, v = a["q"], a["v"]
    (B, T, h, K), (hv, V) = q.shape, v.shape[2:]
    if hv % h:
        raise ValueError(f"{name}: v has {hv} heads, which must be a multiple of q/k's {h} heads (GVA)")
    checks.expect_shape(name, "k", a["k"], tuple(q.shape), "q.shape [B, T, H, K]")
    checks.expect_shape(name, "v", v, (B, T, hv, V), "[B, T, HV, V]")
    for arg in ("g", "beta"):
        checks.expect_shape(name, arg, a[arg], (B, T, hv), "[B, T, HV]")
    checks.expect_shape(name, "gk", a.get("gk"), (B, T, hv, K), "[B, T, HV, K]")
    n = B if a["cu_seqlens"] is None else len(a["cu_seqlens"]) - 1
    checks.check_state(name, a["initial_state"], n, hv, K, V, a["state_v_first"])


def _acc(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _gates(g: Tensor | None, beta: Tensor, kwargs: dict, gk: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
    """Apply fla's in-kernel gate/beta activations; return (log decay `[B, T, H]` or `[B, T, H, K]`, beta)."""
    if kwargs.get("gv") is not None:
        raise ValueError("gated_delta_rule (torch path): a value-side decay `gv` is not supported; pass g or gk")
    if g is not None and kwargs.get("use_gate_in_kernel"):
        A_log, dt_bias = kwargs.get("A_log"), kwargs.get("dt_bias")
        if A_log is None:
            raise ValueError("gated_delta_rule: use_gate_in_kernel=True needs A_log [H]")
        g = _acc(g)
        g = -A_log.to(g.dtype).exp() * F.softplus(g if dt_bias is None else g + dt_bias.to(g.dtype))
    if kwargs.get("use_beta_sigmoid_in_kernel"):
        beta = _acc(beta).sigmoid() * (2.0 if kwargs.get("allow_neg_eigval") else 1.0)
    if gk is not None:
        g = gk if g is None else gk + g[..., None]
    return g, beta


@checked(_check)
def chunk_gated_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    cu_seqlens_cpu: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch chunked WY form. q, k `[B, T, H, K]`, v `[B, T, HV, V]`, g, beta `[B, T, HV]` (HV = H, or a
    multiple for GVA), initial_state `[N, HV, K, V]` (`[N, HV, V, K]` with state_v_first)
    -> o `[B, T, HV, V]` (v's dtype), final state like initial_state (float32) or None."""
    q, k = expand_gva(q, k, v)
    g, beta = _gates(
        g, beta, dict(kwargs, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval)
    )
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(
        _wy.chunk_dplr,
        q,
        kb,
        v,
        a,
        b,
        g,
        scale,
        initial_state,
        output_final_state,
        cu_seqlens,
        state_v_first,
        chunk_size=kwargs.get("chunk_size") or CHUNK_SIZE,
    )


@checked(_check)
def fused_recurrent_gated_delta_rule_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    gk: Tensor | None = None,
    gv: Tensor | None = None,
    beta: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Tensor | None = None,
    dt_bias: Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """PyTorch token loop (decoding path). g `[B, T, H]` and/or gk `[B, T, H, K]` (log decays, optional),
    beta `[B, T, H]` (default ones); shapes otherwise as `chunk_gated_delta_rule_torch`."""
    q, k = expand_gva(q, k, v)
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    opts = dict(
        gv=gv,
        use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
    )
    g, beta = _gates(g, beta, opts, gk)
    scale = k.shape[-1] ** -0.5 if scale is None else scale
    q, kb, a, b = delta_to_dplr(q, k, beta, use_qk_l2norm_in_kernel)
    return _wy.run_dplr(
        _wy.recurrent_dplr, q, kb, v, a, b, g, scale, initial_state, output_final_state, cu_seqlens, state_v_first
    )


STATE = ("scale", "initial_state", "output_final_state", "use_qk_l2norm_in_kernel")
BETA = ("use_beta_sigmoid_in_kernel", "allow_neg_eigval", "state_v_first", "cu_seqlens")
CAST = cast_like("v", "q", "k", "beta")
chunk_gated_delta_rule = fla_dispatch(
    chunk_gated_delta_rule_torch,
    FlaCall(
        "ops.gated_delta_rule",
        "chunk_gated_delta_rule",
        ("q", "k", "v", "g", "beta", *STATE, *BETA, "cu_seqlens_cpu"),
        positional=5,
        kwargs=True,
        adapt=CAST,
        cp=True,
    ),
    check=_check_layout,
    note="Takes fla's cp_context.",
)
fused_recurrent_gated_delta_rule = fla_dispatch(
    fused_recurrent_gated_delta_rule_torch,
    FlaCall(
        "ops.gated_delta_rule",
        "fused_recurrent_gated_delta_rule",
        ("q", "k", "v", "g", "gk", "gv", "beta", *STATE, "use_gate_in_kernel", "A_log", "dt_bias", *BETA),
        positional=3,
        kwargs=True,
        adapt=CAST,
    ),
    check=_check_layout,
)
