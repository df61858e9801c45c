"""The trivial partition: the whole response is one segment (outcome-level credit, as in GRPO)."""

from __future__ import annotations


def whole_boundaries(response_length: int) -> list[tuple[int, int]]:
    """[(0, L)] for a response of L > 0 tokens; [] for an empty response."""
    return [(0, response_length)] if response_length > 0 else []
