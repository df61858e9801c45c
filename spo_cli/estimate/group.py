"""Group baselines: one scalar advantage per sampled response, from the rewards of its prompt's group (GRPO's
normalised group mean, RLOO's leave-one-out mean)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence


def group_advantages(
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    scale_by_std: bool = True,
    eps: float = 1e-8,
) -> list[float]:
    """Compute GRPO advantages by normalising each reward within its group.

    ``A_i = (r_i - mean_g) / (std_g + eps)`` where ``std_g`` is the population
    standard deviation (ddof=0) of the rewards sharing ``group_ids[i]``; with
    ``scale_by_std=False``, ``A_i = r_i - mean_g``. Members of a group whose rewards
    are all equal (including a single-member group) get exactly ``0.0``.

    Args:
        rewards (Sequence[float]): reward per response, length ``N``.
        group_ids (Sequence[Hashable]): group (question) id per response, length ``N``;
            members of a group need not be contiguous.
        scale_by_std (bool): divide by ``std_g + eps``. Default ``True``.
        eps (float): added to the std in the denominator. Default ``1e-8``.

    Returns:
        list[float]: advantage per response, length ``N``, in input order.

    Raises:
        ValueError: if ``rewards`` and ``group_ids`` differ in length, or (``scale_by_std=False``) a
            group's rewards span more than the largest float, so ``r_i - mean_g`` overflows.
    """

    advantages = [0.0] * len(rewards)
    for gid, idx in _groups(rewards, group_ids):
        values = [float(rewards[i]) for i in idx]
        # Tested explicitly: a float mean of equal values can differ from them in the last
        # ulp, and dividing that residue by a ~0 std would give a spurious non-zero advantage.
        if all(v == values[0] for v in values):
            continue
        # In units of a power of two near the largest |reward| (exact): squares of rewards near 1e308 overflow.
        scale = _unit(values)
        scaled = [v / scale for v in values]
        mean = math.fsum(scaled) / len(scaled)
        if scale_by_std:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in scaled) / len(scaled))
            for i, v in zip(idx, scaled):
                advantages[i] = (v - mean) / (std + eps / scale)
        else:
            for i, v in zip(idx, scaled):
                advantages[i] = _unscaled(v - mean, scale, gid, values)
    return advantages


def rloo_advantages(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> list[float]:
    """RLOO advantages: each reward minus the mean reward of the *other* members of its group.

    ``A_i = r_i - (sum_g - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g)``, with no std scaling (the
    reference's GRPO-baseline `adv_method: rloo`). The baseline excludes the response itself, so it is an unbiased
    estimate of the value that does not depend on the response's own reward. A group whose rewards are all equal,
    or of a single member (no others to compare with), gets exactly ``0.0``.

    Args:
        rewards (Sequence[float]): reward per response, length ``N``.
        group_ids (Sequence[Hashable]): group (question) id per response, length ``N``.

    Returns:
        list[float]: advantage per response, length ``N``, in input order.
    """
    advantages = [0.0] * len(rewards)
    for gid, idx in _groups(rewards, group_ids):
        values = [float(rewards[i]) for i in idx]
        if len(values) < 2 or all(v == values[0] for v in values):
            continue
        scale = _unit(values)  # as in group_advantages: the sum of rewards near 1e308 overflows
        scaled = [v / scale for v in values]
        total = math.fsum(scaled)
        for i, v in zip(idx, scaled):
            advantages[i] = _unscaled(v - (total - v) / (len(values) - 1), scale, gid, values)
    return advantages


def _unit(values: Sequence[float]) -> float:
    """The power of two at or just below the largest magnitude of `values` (not all 0): dividing by it is exact (bar
    the underflow of values 2**-1000 times smaller than the largest, too small to change any result) and brings
    every value within (-2, 2)."""
    return math.ldexp(1.0, math.frexp(max(abs(v) for v in values))[1] - 1)


def _unscaled(advantage: float, scale: float, gid: Hashable, values: Sequence[float]) -> float:
    """`advantage * scale`; ValueError when that is beyond the largest float (rewards span more than it)."""
    out = advantage * scale
    if math.isinf(out):
        raise ValueError(
            f"group {gid}: rewards span more than the largest float ({max(values):g} - {min(values):g}): "
            "their advantages cannot be represented; rescale the rewards"
        )
    return out


def _groups(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> list[tuple[Hashable, list[int]]]:
    """(group id, indices of its members) of each group, in first-seen order; rewards and ids must pair up."""
    if len(rewards) != len(group_ids):
        raise ValueError(
            "rewards and group_ids must have the same length, "
            f"got {len(rewards)} and {len(group_ids)}"
        )
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    return list(members.items())
