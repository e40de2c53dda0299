"""SwiGLU gating `silu(gate) * up` (arXiv:2002.05202), the activation of every expert and dense FFN.

On CUDA with fla it runs fla's fused Triton kernel: one pass forward, one pass backward, and only `gate` and `up`
saved for backward (autograd's `F.silu(gate) * up` also keeps `silu(gate)`, an extra [N, F] per layer). It reads
`gate` and `up` as row-strided views, so the two halves of a fused gate|up projection need no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops._dispatch import fla_module_fn, use_fla


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., F] (one shape and dtype) -> silu(gate) * up."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if use_fla(gate) and gate.dtype == up.dtype and gate.numel() > 0:
        return fla_module_fn("activations.ops", "swiglu")(gate, up)
    return F.silu(gate) * up
