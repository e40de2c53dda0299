"""`MoEConfig`: one MoE FFN (router, experts, shared experts, load balancing), plus the published family presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "custom")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
DROP_POLICIES = ("weight", "position")


def canonical_family(name: str) -> str:
    """'qwen2-moe' / 'Qwen2_MoE' -> 'qwen2_moe'; unknown names -> ValueError listing the families."""
    family = name.lower().replace("-", "_")
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {name!r}; valid families: {', '.join(FAMILIES)}")
    return family


@dataclass
class MoEConfig:
    """One MoE FFN. Plain primitives only: `MoEConfig(**dataclasses.asdict(cfg)) == cfg` (YAML round trip).

    Routing: scores = softmax or sigmoid of the float32 router logits [T, E]; optional group-limited routing keeps
    the `topk_group` best of `n_group` expert groups (group score: max, or sum of the top-2 scores); top_k experts
    are selected by score + `expert_bias` (the bias only selects); weights are the selected scores, renormalised
    when `norm_topk_prob`, times `routed_scaling_factor`. See docs/moe.md for every formula.
    """

    family: str = "mixtral"
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_hidden_size: int = 14336
    score_func: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing (DeepSeek-V2/V3); 1 = off
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) or "top2_sum" (DeepSeek-V3)
    num_shared_experts: int = 0
    shared_expert_ffn_hidden_size: int | None = None  # None: num_shared_experts * expert_ffn_hidden_size
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(Linear(D, 1)(x))
    balance_coef: float = 0.0  # expert-level balance loss weight (Switch / DeepSeek alpha1)
    balance_seq_wise: bool = False  # compute the balance loss per sequence (row) and average (DeepSeek-V3)
    device_balance_coef: float = 0.0  # DeepSeek-V2 device-level balance loss weight (alpha2)
    num_devices: int = 1  # expert groups for the device-level loss (experts split contiguously)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (arXiv:2202.08906)
    bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3 gamma); 0 = off
    capacity_factor: float | None = None  # None = dropless
    drop_policy: str = "weight"  # beyond capacity, drop the lowest router weight first, or the latest position
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.family = canonical_family(self.family)
        for name, choices in (
            ("score_func", SCORE_FUNCS),
            ("group_score", GROUP_SCORES),
            ("drop_policy", DROP_POLICIES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r}; valid choices: {', '.join(choices)}")
        for name in ("num_experts", "top_k", "expert_ffn_hidden_size", "n_group", "topk_group", "num_devices"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MoEConfig.{name} must be positive, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"MoEConfig.n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"MoEConfig.topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(
                f"MoEConfig: topk_group={self.topk_group} groups of {self.num_experts // self.n_group} "
                f"experts hold fewer than top_k={self.top_k} experts"
            )
        if self.num_experts % self.num_devices:
            raise ValueError(f"MoEConfig.num_devices={self.num_devices} must divide num_experts={self.num_experts}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be positive or None, got {self.capacity_factor}")
        for name in ("balance_coef", "device_balance_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def shared_ffn_size(self) -> int:
        """Width of the (fused) shared-expert SwiGLU; 0 without shared experts."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_ffn_hidden_size or self.num_shared_experts * self.expert_ffn_hidden_size

    @classmethod
    def preset(cls, family: str, **overrides: Any) -> MoEConfig:
        """The published defaults of `family` with `overrides` (see `moe_preset`)."""
        return moe_preset(family, **overrides)


# Published defaults. Sources: Mixtral-8x7B (arXiv:2401.04088, HF MixtralConfig), Qwen1.5-MoE-A2.7B (HF
# Qwen2MoeConfig), DeepSeek-V2 (arXiv:2405.04434, Sec. 4.1 / HF config), DeepSeek-V3 (arXiv:2412.19437, Sec. 4.2).
_PRESETS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        num_experts=8,
        top_k=2,
        expert_ffn_hidden_size=14336,
        score_func="softmax",
        norm_topk_prob=True,
        balance_coef=0.02,
    ),
    "qwen2_moe": dict(
        num_experts=60,
        top_k=4,
        expert_ffn_hidden_size=1408,
        score_func="softmax",
        norm_topk_prob=False,
        num_shared_experts=1,
        shared_expert_ffn_hidden_size=5632,
        shared_expert_gate=True,
        balance_coef=0.001,
    ),
    "deepseek_v2": dict(
        num_experts=160,
        top_k=6,
        expert_ffn_hidden_size=1536,
        score_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=16.0,
        n_group=8,
        topk_group=3,
        group_score="max",
        num_shared_experts=2,
        balance_coef=0.003,
        balance_seq_wise=True,
        device_balance_coef=0.05,
        num_devices=8,
    ),
    "deepseek_v3": dict(
        num_experts=256,
        top_k=8,
        expert_ffn_hidden_size=2048,
        score_func="sigmoid",
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        n_group=8,
        topk_group=4,
        group_score="top2_sum",
        num_shared_experts=1,
        balance_coef=0.0001,
        balance_seq_wise=True,
        bias_update_rate=0.001,
    ),
    "custom": dict(),
}


def moe_preset(family: str, **overrides: Any) -> MoEConfig:
    """`MoEConfig` with the published defaults of `family`, then `overrides`.

    Overriding `num_experts` shrinks `n_group` / `num_devices` to divisors of it when those are not given
    (so `moe_preset("deepseek_v2", num_experts=8, top_k=2)` stays valid); overriding `expert_ffn_hidden_size`
    keeps an explicit shared-expert width in the family's ratio (Qwen1.5-MoE: 4 x expert width).
    """
    family = canonical_family(family)
    kwargs = dict(_PRESETS[family], family=family)
    if "num_experts" in overrides:
        e = overrides["num_experts"]
        for name in ("n_group", "num_devices"):
            if name not in overrides and name in kwargs and isinstance(e, int) and e > 0:
                kwargs[name] = max(d for d in range(1, min(kwargs[name], e) + 1) if e % d == 0)
        if "topk_group" not in overrides and "topk_group" in kwargs:
            kwargs["topk_group"] = min(kwargs["topk_group"], kwargs["n_group"])
    shared = kwargs.get("shared_expert_ffn_hidden_size")
    if shared and "expert_ffn_hidden_size" in overrides and "shared_expert_ffn_hidden_size" not in overrides:
        kwargs["shared_expert_ffn_hidden_size"] = (
            shared * overrides["expert_ffn_hidden_size"] // kwargs["expert_ffn_hidden_size"]
        )
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(MoEConfig)})
    if unknown:
        raise ValueError(
            f"unknown MoEConfig fields {unknown}; valid: {', '.join(f.name for f in dataclasses.fields(MoEConfig))}"
        )
    kwargs.update(overrides)
    return MoEConfig(**kwargs)


def moe_param_counts(cfg: MoEConfig, hidden_size: int) -> dict[str, int]:
    """Parameter counts of `MoELayer(cfg, hidden_size)`: experts_total, experts_active (top_k experts), router
    (gate [E, D]), shared (shared SwiGLU + its gate). Buffers (expert_bias) are not parameters."""
    per_expert = 3 * hidden_size * cfg.expert_ffn_hidden_size
    shared = 3 * hidden_size * cfg.shared_ffn_size + (
        hidden_size if cfg.shared_expert_gate and cfg.shared_ffn_size else 0
    )
    return {
        "experts_total": cfg.num_experts * per_expert,
        "experts_active": cfg.top_k * per_expert,
        "router": cfg.num_experts * hidden_size,
        "shared": shared,
    }
