"""LM loss: plain cross-entropy, or fla's fused linear cross-entropy on CUDA (never materialises [N, V] logits)."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F


@functools.cache
def _fused_ce_cls():
    try:
        from fla.modules import FusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return FusedLinearCrossEntropyLoss


@contextlib.contextmanager
def tf32_matmuls():
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def fused_available(h: torch.Tensor) -> bool:
    """True when fla's fused linear CE can run on `h` (CUDA tensor, fla importable)."""
    return h.is_cuda and _fused_ce_cls() is not None


def causal_lm_loss(
    h_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor | None, fuse: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, logits) for final hidden states `h_BTD` and LM-head weight `weight_VD`.

    loss = mean CE over targets != -100 (labels already aligned; None without labels; 0 when every target is
    ignored). logits [B, T, V] are returned unless the fused loss ran (then None).
    """
    if labels_BT is not None and fuse and fused_available(h_BTD):
        loss_fn = _fused_ce_cls()(ignore_index=-100, reduction="mean")
        # Under autocast the kernel sees one dtype: cast both operands as autocast would for the matmul.
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else weight_VD.dtype
        # fla accumulates the LM-head gradient in float32 across token chunks (inside this forward call): allow
        # TF32 for those float32 matmuls, which otherwise run as SIMT sgemm (the slowest kernel of a step)
        with tf32_matmuls():
            loss = loss_fn(h_BTD.flatten(0, 1).to(dtype), labels_BT.flatten(), weight_VD.to(dtype))
        return loss, None
    logits_BTV = F.linear(h_BTD, weight_VD)
    if labels_BT is None:
        return None, logits_BTV
    labels_N = labels_BT.flatten()
    # sum / max(count, 1) as fla's fused loss: a micro-batch whose targets are all ignored gives 0, not NaN
    loss_sum = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_N, ignore_index=-100, reduction="sum")
    return loss_sum / labels_N.ne(-100).sum().clamp_min(1), logits_BTV
