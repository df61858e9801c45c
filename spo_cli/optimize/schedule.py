"""Learning-rate schedules as pure step -> multiplier functions."""

from __future__ import annotations

import math
from typing import Literal


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: Literal["constant", "linear", "cosine", "warmup_decay"],
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps` (step 0 gets 1/warmup_steps, so the first update is not
    wasted), then constant, linear or cosine decay from 1 to `min_ratio` at `total_steps`.
    `warmup_decay` is the reference's schedule instead (`warmup_decay_multiplier`).
    """
    if kind == "warmup_decay":
        return warmup_decay_multiplier(step, total_steps, warmup_steps)
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_decay_multiplier(step: int, total_steps: int, warmup_steps: int) -> float:
    """DeepSpeed's `WarmupDecayLR` with its default logarithmic warmup and `warmup_min_lr` 0, as the SPO reference
    trains (docs/reference_settings.md#settings-shared-by-the-spo-papers-configurations), for optimizer step `step`
    (0-based).

    DeepSpeed sets the optimizer to its minimum rate when the scheduler is built and steps the scheduler after each
    optimizer step, so update `step` runs at the rate of scheduler position ``i = step - 1``: 0 for the first
    update; ``log(i + 1) / log(W)`` while ``i < W`` (so also 0 for the second); then
    ``max(0, (T - i) / max(1, T - W))``. With ``W < 2`` there is no logarithmic warmup (DeepSpeed divides by
    ``log(W)``) and the decay starts at once, capped at 1.
    """
    i = step - 1
    if i < 0:
        return 0.0
    if warmup_steps >= 2 and i < warmup_steps:
        return math.log(i + 1) / math.log(warmup_steps)
    return min(1.0, max(0.0, (total_steps - i) / max(1, total_steps - warmup_steps)))


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float = 0.0):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind, min_ratio=min_ratio),
    )
