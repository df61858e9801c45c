"""A fixed number of equal parts per response: the reference's "naive" ablation
(docs/algorithms.md#fixed-count-partition)."""

from __future__ import annotations


def fixed_count_boundaries(response_length: int, num_segments: int = 4) -> list[int]:
    """Start indices of parts ``2..k`` when a response is cut into ``k`` near-equal parts.

    With ``q, r = divmod(L, k)`` the first ``r`` parts have ``q + 1`` tokens and the other
    ``k - r`` have ``q`` (longer parts first, as the reference's
    ``math_episode_generator_w_mc_advantages_naive``). Part ``i`` (0-based) starts at
    ``i * q + min(i, r)``. The start of part 1 (index 0) is never returned: the ablation
    estimates no prompt state, so the first part is a leading region with advantage 0.

    Args:
        response_length (int): number of response tokens ``L``, ``>= 0``.
        num_segments (int): number of parts ``k``, ``>= 1``. Default ``4``.

    Returns:
        list[int]: strictly increasing indices in ``(0, L)``, at most ``k - 1`` of them.
        When ``L < k`` the trailing parts are empty and are skipped, so ``L`` tokens give
        ``L - 1`` boundaries (e.g. ``L=3, k=4 -> [1, 2]``). ``L == 0`` or ``k == 1`` -> ``[]``.
        For such short responses the reference also keeps a state after the whole response,
        whose Monte Carlo value replaces the reward in the last segment's advantage; here the
        last segment always ends with the reward
        (docs/reference_differences.md#fixed-count-partition-of-responses-shorter-than-k-tokens).

    Raises:
        ValueError: if ``response_length < 0`` or ``num_segments < 1``.
    """
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    base, extra = divmod(response_length, num_segments)
    starts = (i * base + min(i, extra) for i in range(1, num_segments))
    # An empty part starts at L; returning it would open a segment with no tokens.
    return [s for s in starts if s < response_length]
