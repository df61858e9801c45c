"""The trivial partition: the whole response is one segment (outcome-level credit, as in GRPO)."""

from __future__ import annotations


def whole_boundaries(response_length: int) -> list[int]:
    """[0] for a response of L > 0 tokens (one segment, whose start state is the prompt); [] when empty."""
    return [0] if response_length > 0 else []
