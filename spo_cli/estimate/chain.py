"""SPO-chain advantages from Monte-Carlo values at segment boundaries (docs/algorithms.md#spo-chain)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _check_boundaries(boundaries: Sequence[int], boundary_values: Sequence[float]) -> None:
    if len(boundaries) != len(boundary_values):
        raise ValueError(
            "boundaries and boundary_values must have the same length, "
            f"got {len(boundaries)} and {len(boundary_values)}"
        )
    if boundaries and boundaries[0] < 0:
        raise ValueError(f"boundaries must be non-negative, got {list(boundaries)}")
    for prev, cur in zip(boundaries, boundaries[1:]):
        if cur <= prev:
            raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")


def chain_segment_advantages(
    boundaries: Sequence[int], boundary_values: Sequence[float], reward: float
) -> list[float]:
    """One advantage per boundary segment: value after the segment minus value before it.

    Segment ``j`` runs from ``boundaries[j]`` to ``boundaries[j + 1]`` (the last one to the
    end of the response) and gets ``V_{j+1} - V_j``, with ``V_j = boundary_values[j]`` and
    the end value of the last segment being the final ``reward`` (no discount, gamma = 1).
    The leading region before ``boundaries[0]`` is not a boundary segment and has no entry
    (its advantage is 0, see :func:`chain_token_advantages`).

    Args:
        boundaries (Sequence[int]): strictly increasing, non-negative response-token
            indices that open a segment, shape ``[K]``.
        boundary_values (Sequence[float]): MC value of the state before each boundary
            (the prompt state for a boundary at 0), shape ``[K]``.
        reward (float): final reward ``R`` of the complete response.

    Returns:
        list[float]: ``[V_1 - V_0, ..., V_{K-1} - V_{K-2}, R - V_{K-1}]``, shape ``[K]``;
        ``[]`` when there are no boundaries.

    Raises:
        ValueError: if the two sequences differ in length or ``boundaries`` is not strictly
            increasing and non-negative.
    """
    _check_boundaries(boundaries, boundary_values)
    ends = [*boundary_values[1:], reward]
    return [float(end) - float(start) for start, end in zip(boundary_values, ends)]


def chain_token_advantages(
    response_logprobs: Sequence[float],
    boundaries: Sequence[int],
    boundary_values: Sequence[float],
    reward: float,
    rho: float | None = 0.9,
) -> list[float]:
    """Per-token advantages exactly as the reference SPO-chain episode generator emits them.

    ``MathEpisodeGeneratorWithMCAdvantages._compute_token_advantages`` (Guo et al.,
    arXiv 2505.23564), restated on boundaries ``b_j`` (= the reference's cutpoint + 1):

    1. Every token of segment ``[b_j, b_{j+1})`` gets ``V_{j+1} - V_j``, and every token of
       the last segment ``[b_{K-1}, L)`` gets ``reward - V_{K-1}``
       (:func:`chain_segment_advantages`).
    2. Tokens of the leading region ``[0, b_0)`` get 0: their start state (the prompt) was
       not estimated. With ``b_0 == 0`` there is no leading region and ``V_0`` is the
       prompt value. Without boundaries every token gets 0.
    3. Probability mask: a token with ``exp(logprob) > rho`` (strict, float64) gets 0, so
       only low-probability tokens carry credit. ``rho=None`` skips this step, as the
       fixed-count ("naive") ablation does.

    Args:
        response_logprobs (Sequence[float]): ``log pi_old(y_t | x, y_<t)`` per response
            token, shape ``[L]``; also fixes the response length ``L``.
        boundaries (Sequence[int]): strictly increasing indices in ``[0, L)``, shape ``[K]``.
        boundary_values (Sequence[float]): MC value of the state before each boundary,
            shape ``[K]``.
        reward (float): final reward ``R`` of the response.
        rho (float | None): probability above which a token's advantage is zeroed, in
            ``(0, 1]``; ``None`` disables the mask. Default ``0.9``.

    Returns:
        list[float]: advantage per response token, shape ``[L]``.

    Raises:
        ValueError: if ``boundaries`` and ``boundary_values`` differ in length, a boundary
            is outside ``[0, L)``, the boundaries are not strictly increasing, or ``rho`` is
            not ``None`` and not in ``(0, 1]``.
    """
    if rho is not None and not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1] or None, got {rho}")
    length = len(response_logprobs)
    segment_advantages = chain_segment_advantages(boundaries, boundary_values, reward)
    if boundaries and boundaries[-1] >= length:
        raise ValueError(
            f"boundaries must lie in [0, {length}) (len(response_logprobs)), got {list(boundaries)}"
        )
    advantages = [0.0] * length
    ends = [*boundaries[1:], length]
    for start, end, advantage in zip(boundaries, ends, segment_advantages):
        advantages[start:end] = [advantage] * (end - start)
    if rho is not None:
        # Strict '>' as in the reference: a token at exactly rho keeps its advantage.
        advantages = [0.0 if math.exp(lp) > rho else a for lp, a in zip(response_logprobs, advantages)]
    return advantages
