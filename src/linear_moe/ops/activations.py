"""SwiGLU gating `silu(gate) * up` (arXiv:2002.05202), the activation of every expert and dense FFN.

On CUDA with fla it runs fla's fused Triton kernel: one pass forward, one pass backward, and only `gate` and `up`
saved for backward (autograd's `F.silu(gate) * up` also keeps `silu(gate)`, an extra [N, F] per layer). It reads
`gate` and `up` as row-strided views, so the two halves of a fused gate|up projection need no copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.ops._dispatch import Args, FlaCall, checked, fla_dispatch


def _check(name: str, a: Args) -> None:
    if a["gate"].shape != a["up"].shape:
        raise ValueError(f"{name}: gate {tuple(a['gate'].shape)} and up {tuple(a['up'].shape)} must have one shape")


@checked(_check)
def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., F] (one shape and dtype) -> silu(gate) * up."""
    return F.silu(gate) * up


swiglu = fla_dispatch(
    swiglu_torch,
    FlaCall(
        "modules.activations.ops",
        "swiglu",
        ("gate", "up"),
        positional=2,
        when=lambda a: a["gate"].dtype == a["up"].dtype and a["gate"].numel() > 0,
    ),
)
