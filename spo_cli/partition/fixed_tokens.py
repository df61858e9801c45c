"""Segments of a fixed number of tokens, starting at the prompt state."""

from __future__ import annotations


def fixed_tokens_boundaries(response_length: int, segment_tokens: int) -> list[int]:
    """Boundaries every ``M`` tokens: ``[0, M, 2M, ...]`` strictly below ``L``.

    Unlike :func:`~spo_cli.partition.fixed_count.fixed_count_boundaries`, index 0 is a
    boundary, so the prompt state is estimated and there is no leading region. The last
    segment holds the remaining ``L - M * floor((L - 1) / M)`` tokens (between 1 and ``M``).

    Args:
        response_length (int): number of response tokens ``L``, ``>= 0``.
        segment_tokens (int): tokens per segment ``M``, ``>= 1``.

    Returns:
        list[int]: ``ceil(L / M)`` strictly increasing indices; ``[]`` when ``L == 0``.

    Raises:
        ValueError: if ``response_length < 0`` or ``segment_tokens < 1``.
    """
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
    return list(range(0, response_length, segment_tokens))
