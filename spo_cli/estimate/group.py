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
        ValueError: if ``rewards`` and ``group_ids`` differ in length.
    """

    advantages = [0.0] * len(rewards)
    for idx in _groups(rewards, group_ids):
        values = [float(rewards[i]) for i in idx]
        # Tested explicitly: a float mean of equal values can differ from them in the last
        # ulp, and dividing that residue by a ~0 std would give a spurious non-zero advantage.
        if all(v == values[0] for v in values):
            continue
        mean = math.fsum(values) / len(values)
        if scale_by_std:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
            for i, v in zip(idx, values):
                advantages[i] = (v - mean) / (std + eps)
        else:
            for i, v in zip(idx, values):
                advantages[i] = v - mean
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
    for idx in _groups(rewards, group_ids):
        values = [float(rewards[i]) for i in idx]
        if len(values) < 2 or all(v == values[0] for v in values):
            continue
        total = math.fsum(values)
        for i, v in zip(idx, values):
            advantages[i] = v - (total - v) / (len(values) - 1)
    return advantages


def _groups(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> list[list[int]]:
    """Indices of each group's members, in first-seen order; rewards and ids must pair up."""
    if len(rewards) != len(group_ids):
        raise ValueError(
            "rewards and group_ids must have the same length, "
            f"got {len(rewards)} and {len(group_ids)}"
        )
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    return list(members.values())
