"""Learning-rate schedules as pure step -> multiplier functions."""

from __future__ import annotations

import math
from typing import Literal


def lr_multiplier(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    kind: Literal["constant", "linear", "cosine"],
    min_ratio: float = 0.0,
) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from 0 over `warmup_steps` (step 0 gets 1/warmup_steps, so the first update is not
    wasted), then constant, linear or cosine decay from 1 to `min_ratio` at `total_steps`.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if kind == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float = 0.0):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind, min_ratio=min_ratio),
    )
