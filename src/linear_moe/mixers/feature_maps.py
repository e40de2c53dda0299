"""Feature maps phi for linear attention: sim(q, k) = phi(q) . phi(k) replaces exp(q . k).

Every map is a module `phi(x [..., d]) -> [..., out_dim]` with an `out_dim` attribute (the key dimension the
recurrent state sees). `build_feature_map(name, head_dim)` builds one by name with a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _pairwise_products(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Products x_i x_j of one vector: (off-diagonal i < j [..., d(d-1)/2], diagonal x_i^2 [..., d])."""
    d = x.shape[-1]
    i, j = torch.triu_indices(d, d, offset=1, device=x.device)
    return x[..., i] * x[..., j], x * x


class Elementwise(nn.Module):
    """phi = an elementwise function (relu, elu+1, silu, identity, ...); out_dim = head_dim."""

    def __init__(self, head_dim: int, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.out_dim, self.fn = head_dim, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def elu_p1(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (Katharopoulos et al., arXiv:2006.16236)."""
    return F.elu(x) + 1.0


ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "elu": F.elu,
    "elu_p1": elu_p1,
    "silu": F.silu,
    "swish": F.silu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
}


class TaylorFeatureMap(nn.Module):
    """Second-order Taylor expansion of exp(q . k / sqrt(d)) (Based, arXiv:2402.18668):
    phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d).  out_dim = 1 + d + d(d+1)/2."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim, self.out_dim = head_dim, 1 + head_dim + head_dim * (head_dim + 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.head_dim
        off, diag = _pairwise_products(x)
        return torch.cat([torch.ones_like(x[..., :1]), x * d**-0.25, diag * (2 * d) ** -0.5, off * d**-0.5], dim=-1)


class RebasedFeatureMap(nn.Module):
    """ReBased's learnable quadratic kernel (arXiv:2402.10644): x' = layernorm(x) * gamma + beta (or the affine part
    alone), phi(x') . phi(y') = (x' . y')^2 / d.  out_dim = d(d+1)/2. Parameters `gamma`, `beta` as in fla."""

    def __init__(self, head_dim: int, use_gamma: bool = True, use_beta: bool = True, normalize: bool = True):
        super().__init__()
        if not use_gamma and not normalize:
            raise ValueError("RebasedFeatureMap: needs use_gamma=True or normalize=True (valid: any other combination)")
        self.head_dim, self.out_dim, self.normalize = head_dim, head_dim * (head_dim + 1) // 2, normalize
        self.gamma = nn.Parameter(torch.ones(head_dim)) if use_gamma else None
        self.beta = nn.Parameter(torch.zeros(head_dim)) if use_beta else None

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            return F.layer_norm(x, (self.head_dim,), self.gamma, self.beta)
        x = x * self.gamma
        return x + self.beta if self.beta is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        off, diag = _pairwise_products(self.affine(x))
        return torch.cat([diag * self.head_dim**-0.5, off * (2 / self.head_dim) ** 0.5], dim=-1)


class HadamardFeatureMap(nn.Module):
    """phi(x) = layer1(x) * layer2(x) (fla's "elementwise_product"; learnable, out_dim = d)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.out_dim = head_dim
        self.layer1, self.layer2 = nn.Linear(head_dim, head_dim), nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x) * self.layer2(x)


class HedgehogFeatureMap(nn.Module):
    """Hedgehog (arXiv:2402.04347): phi(x) = softmax([2 W x, -2 W x]), W initialised to identity; out_dim = 2d."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.out_dim = 2 * head_dim
        self.layer = nn.Linear(head_dim, head_dim)
        nn.init.eye_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = 2 * self.layer(x)
        return torch.cat([y, -y], dim=-1).softmax(-1)


class T2RFeatureMap(nn.Module):
    """T2R (arXiv:2103.13076): phi(x) = relu(W x); out_dim = d."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.out_dim = head_dim
        self.layer = nn.Linear(head_dim, head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).relu()


class DPFPFeatureMap(nn.Module):
    """DPFP (arXiv:2102.11174): r = [relu(x), relu(-x)], phi = concat_j r * roll(r, j) for j = 1..nu; out_dim = 2 d nu."""

    def __init__(self, head_dim: int, nu: int = 4):
        super().__init__()
        self.nu, self.out_dim = nu, 2 * head_dim * nu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.cat([x.relu(), (-x).relu()], dim=-1)
        return torch.cat([r * r.roll(j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)


LEARNABLE: dict[str, Callable[[int], nn.Module]] = {
    "taylor_exp": TaylorFeatureMap,
    "rebased": RebasedFeatureMap,
    "elementwise_product": HadamardFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "t2r": T2RFeatureMap,
    "dpfp": DPFPFeatureMap,
}
FEATURE_MAPS = sorted([*ELEMENTWISE, *LEARNABLE])


def build_feature_map(name: str, head_dim: int, owner: str = "feature_map") -> nn.Module:
    """The feature map `name` for heads of size `head_dim` (see FEATURE_MAPS for the valid names)."""
    if name in ELEMENTWISE:
        return Elementwise(head_dim, ELEMENTWISE[name])
    if name in LEARNABLE:
        return LEARNABLE[name](head_dim)
    raise ValueError(f"{owner}: unknown feature map {name!r}; valid: {', '.join(FEATURE_MAPS)}")
