"""Turn segment boundaries into half-open token spans covering a response."""

from __future__ import annotations

from collections.abc import Sequence


def segments_from_boundaries(boundaries: Sequence[int], length: int) -> list[tuple[int, int, bool]]:
    """Half-open ``(start, end, is_boundary)`` spans that cover ``[0, length)`` exactly.

    Each boundary ``b_j`` opens the span ``(b_j, b_{j+1}, True)``, the last one ending at
    ``length``. If there is no boundary at 0 (``boundaries`` empty or ``boundaries[0] > 0``),
    a leading span ``(0, b_0 or length, False)`` comes first: its start state gets no value
    estimate, so estimators give its tokens advantage 0.

    Args:
        boundaries (Sequence[int]): strictly increasing token indices in ``[0, length)``,
            shape ``[K]``.
        length (int): number of response tokens ``L``, ``>= 0``.

    Returns:
        list[tuple[int, int, bool]]: ``K`` spans, plus one leading span when
        ``boundaries[0] != 0``; every span is non-empty. ``length == 0`` -> ``[]``
        (``boundaries`` must then be empty). Examples: ``([], 4) -> [(0, 4, False)]``;
        ``([2], 4) -> [(0, 2, False), (2, 4, True)]``; ``([0, 3], 4) -> [(0, 3, True), (3, 4, True)]``.

    Raises:
        ValueError: if ``length < 0``, a boundary is outside ``[0, length)`` or the
            boundaries are not strictly increasing.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    for prev, cur in zip(boundaries, boundaries[1:]):
        if cur <= prev:
            raise ValueError(f"boundaries must be strictly increasing, got {list(boundaries)}")
    if boundaries and not (0 <= boundaries[0] and boundaries[-1] < length):
        raise ValueError(f"boundaries must lie in [0, {length}), got {list(boundaries)}")
    if length == 0:
        return []
    spans: list[tuple[int, int, bool]] = []
    if not boundaries or boundaries[0] > 0:
        spans.append((0, boundaries[0] if boundaries else length, False))
    ends = [*boundaries[1:], length]
    spans.extend((start, end, True) for start, end in zip(boundaries, ends))
    return spans


def off_tool_spans(boundaries: Sequence[int], tool_spans: Sequence[tuple[int, int]], length: int) -> list[int]:
    """Boundaries moved out of the tokens a tool wrote: a segment never starts inside a tool's output (the state
    there is not one the policy chose); one inside ``[s, e)`` moves to ``e``, the policy's next token, and is
    dropped when the output ends the response or another boundary is already there.

    Args:
        boundaries (Sequence[int]): strictly increasing token indices in ``[0, length)``, shape ``[K]``.
        tool_spans (Sequence[tuple[int, int]]): ordered, disjoint half-open token ranges.
        length (int): number of response tokens.

    Returns:
        list[int]: strictly increasing indices in ``[0, length)``, none inside a tool span, at most ``K`` of them.
        Examples: ``([0, 4, 7], [(3, 6)], 9) -> [0, 6, 7]``; ``([2, 3], [(1, 4)], 9) -> [4]``;
        ``([5], [(4, 9)], 9) -> []``.
    """
    moved = []
    for b in boundaries:
        for start, end in tool_spans:
            if start <= b < end:
                b = end
                break
        if b < length and (not moved or moved[-1] < b):
            moved.append(b)
    return moved
