"""Learning-rate schedules: pure functions of the optimizer step.

`step` counts optimizer updates from 0; `lr_at(step, ...)` is the learning rate used by update `step`
(so the first update already uses a non-zero warmup rate). Both schedules start with a linear warmup
over `warmup` steps from lr/warmup to lr, and reach `min_lr` exactly at the last step `total - 1`:

- cosine: half a cosine from `lr` to `min_lr` over the steps after warmup.
- wsd (warmup-stable-decay, arXiv:2404.06395): constant `lr`, then a linear decay to `min_lr` over the
  last `round(decay_fraction * total)` steps (at least one).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd")


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """Linear warmup: `lr * (step + 1) / warmup` for `step < warmup`, `lr` afterwards."""
    return lr * (step + 1) / warmup if step < warmup else lr


def cosine_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Warmup, then cosine decay from `lr` (step `warmup`) to `min_lr` (step `total - 1`)."""
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_lr(step: int, lr: float, min_lr: float, warmup: int, total: int, decay_fraction: float) -> float:
    """Warmup, stable at `lr`, then linear decay to `min_lr` over the last `round(decay_fraction * total)` steps."""
    decay_steps = max(1, round(decay_fraction * total))
    decay_start = max(warmup, total - decay_steps)
    if step < warmup:
        return warmup_lr(step, lr, warmup)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return lr - (lr - min_lr) * progress


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    total: int,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The learning rate for optimizer update `step` (0-based) of a run of `total` updates."""
    if schedule == "cosine":
        return cosine_lr(step, lr, min_lr, warmup, total)
    if schedule == "wsd":
        return wsd_lr(step, lr, min_lr, warmup, total, decay_fraction)
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
